"""`ringtrain train` under a real mpirun: sync equivalence, identical results across schemes,
exact resume, and clear errors for bad input."""
import os

import pytest
import torch

from conftest import fails_with, ok, train
from ringtrain.analysis import load_run

STEPS = "12"


def params(path):
    snap = torch.load(path, weights_only=True)
    return snap["MODEL_STATE"]


def max_rel_diff(a, b):
    worst = 0.0
    for k in a:
        d = (a[k].double() - b[k].double()).abs().max().item()
        scale = max(1e-3, a[k].double().abs().max().item())
        worst = max(worst, d / scale)
    return worst


@pytest.mark.parametrize("n", [2, 3])
def test_n_ranks_of_batch_b_equal_one_process_of_batch_nb(tmp_path, n):
    # mlp: no dropout and no BatchNorm, so the only difference left is float round-off.
    # 1500 training digits divide evenly by 2 and 3, so no padding sample is repeated.
    common = ["--model", "mlp", "--steps", STEPS, "--lr", "0.1", "--save-every", "0"]
    ok(train(1, *common, "--batch-size", str(8 * n), "--snapshot", str(tmp_path / "one.pt"), "--run-dir", str(tmp_path / "one")))
    ok(train(n, *common, "--batch-size", "8", "--snapshot", str(tmp_path / "many.pt"), "--run-dir", str(tmp_path / "many")))
    assert max_rel_diff(params(tmp_path / "one.pt"), params(tmp_path / "many.pt")) < 1e-5


def test_ring_mpi_ddp_end_with_the_same_parameters(tmp_path):
    finals = {}
    for backend in ("ring", "mpi", "ddp"):
        snap = tmp_path / f"{backend}.pt"
        ok(train(2, "--backend", backend, "--model", "cnn", "--steps", STEPS, "--save-every", "0",
                 "--snapshot", str(snap), "--run-dir", str(tmp_path / backend)))
        finals[backend] = params(snap)
    assert max_rel_diff(finals["ring"], finals["mpi"]) < 1e-5
    assert max_rel_diff(finals["ring"], finals["ddp"]) < 1e-5


def test_no_overlap_every_wait_mode_and_layout_check_give_the_same_parameters_as_overlap(tmp_path):
    # Every mode but "private" sums the buckets straight out of the ring's shared memory;
    # "private" (and "private-tags") keep them in torch's memory and send the ring's messages.
    # At N = 2 every path adds the same two numbers: bitwise equal.
    modes = {"overlap": [], "no-overlap": ["--no-overlap"], "spin": ["--comm-wait", "spin"], "sleep": ["--comm-wait", "sleep"],
             "check-in-tags": ["--layout-check", "always"], "no-check": ["--layout-check", "never"],
             "private": ["--grad-buffers", "private"], "private-tags": ["--grad-buffers", "private", "--layout-check", "always"]}
    for mode, flags in modes.items():
        ok(train(2, "--model", "mlp", "--steps", "8", "--save-every", "0", "--bucket-cap-mb", "0.05", *flags,
                 "--snapshot", str(tmp_path / f"{mode}.pt"), "--run-dir", str(tmp_path / mode)))
    a = params(tmp_path / "overlap.pt")
    for mode in modes:
        b = params(tmp_path / f"{mode}.pt")
        assert all(torch.equal(a[k], b[k]) for k in a), mode
    for mode, expect in (("overlap", "shared"), ("private", "private")):
        assert load_run(str(tmp_path / mode)).manifest["scheme_grad_buffers"] == expect


def test_resumed_run_is_bitwise_identical_to_an_uninterrupted_one(tmp_path):
    # cnn has dropout: the per-step reseeding must replay the same masks after resume.
    common = ["--model", "cnn", "--batch-size", "16", "--epochs", "2", "--save-every", "0"]
    ok(train(2, *common, "--snapshot", str(tmp_path / "full.pt"), "--run-dir", str(tmp_path / "full")))
    # Interrupted mid-epoch (step 30 of 2 x 47), then resumed into the same run directory.
    ok(train(2, *common, "--steps", "30", "--snapshot", str(tmp_path / "part.pt"), "--run-dir", str(tmp_path / "part")))
    proc = ok(train(2, *common, "--resume", "--snapshot", str(tmp_path / "part.pt"), "--run-dir", str(tmp_path / "part")))
    assert "Resuming training from snapshot" in proc.stdout
    a, b = params(tmp_path / "full.pt"), params(tmp_path / "part.pt")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed parameters differ from the uninterrupted run"
    # The resumed run added a segment and left the first one alone.
    assert os.path.exists(tmp_path / "part" / "rank-00000.h5")
    assert os.path.exists(tmp_path / "part" / "rank-00000.seg-001.h5")


def test_snapshot_lines_and_summary_are_printed(tmp_path):
    proc = ok(train(2, "--epochs", "2", "--snapshot", str(tmp_path / "s.pt"), "--run-dir", str(tmp_path / "r")))
    out = proc.stdout
    assert "[RANK0] Epoch 1 | Batchsize: 32 | Steps: 24" in out
    assert f"Epoch 1 | Training snapshot saved at {tmp_path / 's.pt'}" in out
    assert "Img/sec per rank" in out and "Total img/sec on 2 rank(s)" in out and "held-out accuracy" in out
    assert out.count("Summary:") == 1  # rank 0 alone prints


def test_digits_trains_to_high_accuracy(tmp_path):
    proc = ok(train(2, "--epochs", "4", "--lr", "0.1", "--json", str(tmp_path / "s.json"), "--run-dir", str(tmp_path / "r")))
    import json

    s = json.load(open(tmp_path / "s.json"))
    assert s["test_accuracy"] > 0.85, proc.stdout


# ---- bad input: a clear message, a non-zero exit, no hang ---------------------------------


def test_missing_dataset_directory(tmp_path):
    fails_with(train(2, "--dataset", "cifar10", "--data-dir", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "r"), timeout=60),
               "does not exist", "rank 0")


def test_malformed_dataset_directory(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "data_batch_1").write_bytes(b"garbage")
    fails_with(train(2, "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "r"), timeout=60),
               "not a CIFAR-10 python-format directory")


def test_unknown_model(tmp_path):
    fails_with(train(2, "--model", "vgg99", timeout=60), "invalid choice: 'vgg99'")


def test_batch_larger_than_shard(tmp_path):
    fails_with(train(2, "--batch-size", "1000", "--run-dir", str(tmp_path / "r"), timeout=60), "larger than each rank's shard of 750")


def test_corrupt_snapshot(tmp_path):
    (tmp_path / "s.pt").write_bytes(b"\x00not a snapshot")
    fails_with(train(2, "--resume", "--snapshot", str(tmp_path / "s.pt"), "--run-dir", str(tmp_path / "r"), timeout=60),
               "is corrupt or not a ringtrain snapshot", "rank 0")


def test_snapshot_of_another_model(tmp_path):
    ok(train(2, "--model", "mlp", "--steps", "2", "--snapshot", str(tmp_path / "s.pt"), "--run-dir", str(tmp_path / "a")))
    fails_with(train(2, "--model", "cnn", "--resume", "--snapshot", str(tmp_path / "s.pt"), "--run-dir", str(tmp_path / "b"), timeout=60),
               "is of model 'mlp'", "--model mlp")


def test_out_of_range_options():
    fails_with(train(1, "--batch-size", "0", timeout=60), "must be a positive integer")
    fails_with(train(1, "--lr", "-1", timeout=60), "must be > 0")


def test_staged_path_gives_the_same_parameters(tmp_path):
    # The GPU path packs gradients into a device buffer and copies them to a host buffer for the
    # ring; --stage-through-host runs exactly those calls with host tensors.
    for mode in ("direct", "staged"):
        flags = ["--stage-through-host"] if mode == "staged" else []
        for backend in ("ring", "mpi"):
            ok(train(2, "--backend", backend, "--model", "mlp", "--steps", "6", "--save-every", "0", *flags,
                     "--snapshot", str(tmp_path / f"{backend}-{mode}.pt"), "--run-dir", str(tmp_path / f"{backend}-{mode}")))
    for backend in ("ring", "mpi"):
        a, b = params(tmp_path / f"{backend}-direct.pt"), params(tmp_path / f"{backend}-staged.pt")
        assert all(torch.equal(a[k], b[k]) for k in a)
    import h5py

    with h5py.File(tmp_path / "ring-staged" / "rank-00000.h5", "r", libver="latest", swmr=True) as f:
        assert f.attrs["scheme_staging"] == "host-copy"


def test_device_selection_without_cuda():
    from ringtrain.train import choose_device

    assert choose_device("auto", 3).type == "cpu"
    assert choose_device("cpu", 0).type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            choose_device("cuda", 0)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_every_model_trains_and_agrees_across_ranks(tmp_path, optimizer):
    # BatchNorm (0-dim num_batches_tracked) and Adam (0-dim step) states must broadcast too.
    from ringtrain.models import MODELS

    for model in sorted(MODELS):
        ok(train(2, "--model", model, "--dataset", "synthetic", "--synthetic-shape", "3,32,32", "--synthetic-samples", "16",
                 "--batch-size", "2", "--steps", "2", "--optimizer", optimizer, "--lr", "0.01", "--save-every", "0",
                 "--snapshot", str(tmp_path / f"{model}.pt"), "--run-dir", str(tmp_path / model), timeout=300))
