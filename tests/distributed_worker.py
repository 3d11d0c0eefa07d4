"""One process of the multi-process tests (tests/test_distributed.py): `enfpde train` through the CLI, then a
forecast of the test split's initial states with the trained model.

    python tests/distributed_worker.py PRESET RUN_DIR [--resume] [--kill-at-step K] [--predict OUT.npy] [--evaluate]
        [--coordinator HOST:PORT --num-processes N --process-id I] [--devices D]

``--kill-at-step K``: process 1 kills itself with SIGKILL right after its checkpoint at step K is written
(a process dying abruptly mid-run, at a known point). ``--devices D`` simulates D CPU devices in this process.
The forecast is written by process 0 only (every process computes its share of it).
"""

import argparse
import os
import signal
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("preset")
    parser.add_argument("run_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--predict", default=None)
    parser.add_argument("--evaluate", action="store_true", help="then `enfpde evaluate` the run (no figures)")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--coordinator", default=None)
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    args = parser.parse_args()
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"

    import jax
    import numpy as np

    from enfpde import cli
    from enfpde.data.trajectories import TrajectoryDataset
    from enfpde.forecaster import Forecaster
    from enfpde.trainer import Trainer

    if args.kill_at_step is not None:
        save = Trainer._save

        def save_then_die(self, manager, step):
            save(self, manager, step)
            if step == args.kill_at_step and jax.process_index() == 1:
                manager.wait_until_finished()
                os.kill(os.getpid(), signal.SIGKILL)

        Trainer._save = save_then_die

    distributed_flags = []
    if args.coordinator is not None:
        distributed_flags = ["--coordinator", args.coordinator, "--num-processes", str(args.num_processes),
                             "--process-id", str(args.process_id)]
    train = ["train", "--preset", args.preset, "--run-dir", args.run_dir, "--quiet", *distributed_flags]
    code = cli.main(train + (["--resume"] if args.resume else []))
    if code != 0:
        return code
    if args.predict:
        model = Forecaster.load(args.run_dir, batch_size=1)  # one state per chunk: the chunks split over processes
        test = TrajectoryDataset.open(model.config.data.test)
        prediction = model.predict(test.coords, test.values[:, 0], np.arange(4.0))
        if jax.process_index() == 0:
            np.save(args.predict, prediction)
    if args.evaluate:
        code = cli.main(["evaluate", args.run_dir, "--no-figures", "--quiet", *distributed_flags])
        if code != 0:
            return code
    print(f"process {jax.process_index()} of {jax.process_count()} with {jax.local_device_count()} device(s): done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
