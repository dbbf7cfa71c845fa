"""Shared test fixtures."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP oversubscription stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def isolated_cache(tmp_path_factory, monkeypatch):
    """Built-in datasets (and compiled kernels) cached under this session's temp dir, not ~/.cache."""
    monkeypatch.setenv("MIMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "mimlab-cache"))


# a whole study in seconds: every stage of `mimlab reproduce` at toy scale (tests of the pipeline, not evidence)
MINI_STUDY = """
preset: quick
model_kwargs: img_size=32,patch_size=8,depth=3,embed_dim=32,num_heads=2
pretrain_data: builtin:fractal-leaves?classes=8&per_class=8&seed=0
pretrain_steps: 4
pretrain_batch_size: 16
probe_images: 16
probe_batch_size: 8
bootstrap: 20
transfer_steps: {classify: 3, keypoints: 3, depth: 3, track: 3}
transfer_batch_size: 8
ablation_blocks: 1
transfer_data:
  classify: {kind: finegrained, num_classes: 3, train_per_class: 8, val_per_class: 4, size: 32}
  keypoints: {kind: keypoints, train_images: 8, val_images: 4, size: 32}
  depth: {kind: depth, train_images: 8, val_images: 4, width: 32, height: 32}
  track: {kind: tracking, train_sequences: 3, val_sequences: 2, length: 6, size: 48}
"""


def _global_torch_state() -> dict:
    """Process-wide settings a test could change and leave behind, changing every later in-process run's numbers."""
    import torch.distributed as dist

    return {"threads": torch.get_num_threads(), "default_dtype": torch.get_default_dtype(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "matmul_precision": torch.get_float32_matmul_precision(),
            "grad_enabled": torch.is_grad_enabled(),
            "process_group": dist.is_available() and dist.is_initialized()}


@pytest.fixture(autouse=True)
def _no_leaked_global_state(request):
    """A test that leaves torch's global state changed fails here, naming what it changed (later tests compare
    in-process runs with subprocess runs bit for bit, so a leaked thread count is a wrong result, not noise)."""
    before = _global_torch_state()
    yield
    after = _global_torch_state()
    leaked = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    if leaked:
        for k, (was, _) in leaked.items():           # put it back, so one leak fails one test, not every later one
            if k == "threads":
                torch.set_num_threads(was)
        pytest.fail(f"left torch's global state changed (before, after): {leaked}", pytrace=False)
