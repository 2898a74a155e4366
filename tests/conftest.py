from pathlib import Path

import pytest

from cascade.data.store import write_dataset
from cascade.data.synth import WORLD_FILE, WorldConfig, generate

SMALL = WorldConfig(users=120, items=600, requests=400, history_max=20, quotas=(60, 20, 8, 4), seed=7)
ML1M = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-1m"


@pytest.fixture(scope="session")
def small_world():
    """(dataset, world) of a small synthetic world."""
    return generate(SMALL)


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory, small_world):
    """A valid log directory of the small world (read-only: copy it before corrupting)."""
    ds, world = small_world
    return write_dataset(ds, tmp_path_factory.mktemp("world") / "small", {WORLD_FILE: world.to_bytes()})


@pytest.fixture(scope="session")
def ml1m_dir():
    if not (ML1M / "ratings.dat").exists():
        pytest.skip(f"MovieLens-1M not found at {ML1M} (the shared copy sits beside the repo)")
    return ML1M
