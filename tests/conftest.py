import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
from hypothesis import Phase, settings  # noqa: E402

# `pytest --hypothesis-profile=noshrink`: report a failing example at once instead of shrinking it for minutes
# (a whole-suite run on a loaded machine); the default profile is unchanged
settings.register_profile("noshrink", phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target])


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (float32), loaded once per test session."""
    from prune_heads.model.loading import load_model

    return load_model("smollm2", dtype="float32", device="cpu")
