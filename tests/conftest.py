import pytest

from enfpde.testing import all_geometries

GEOMETRIES = all_geometries()


@pytest.fixture(params=list(GEOMETRIES), ids=list(GEOMETRIES))
def geometry(request):
    return GEOMETRIES[request.param]
