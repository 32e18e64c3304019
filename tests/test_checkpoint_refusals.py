"""A checkpoint directory is input from disk: damaged, hand-edited or planted input is
refused cleanly and quickly, and the checkpoint code never loses what it committed.

Each case plants one problem in the newer of two committed checkpoints of a run and
checks every entry point (``assert_refused_everywhere``): ``validate_checkpoint``,
``find_latest_checkpoint``, ``load_checkpoint``, ``CheckpointManager.load_latest``,
``consolidate``, both CLI commands and the launcher's resume scan. Each must raise a
``CheckpointError`` naming the file and the field (or fall back to the older checkpoint),
and none may hang (``deadline``). Pruning, the writer lock, a full disk, re-saving a
committed step, and ``ckpt consolidate``'s output path are in test_checkpoint_writes.py.
Single process, fast.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tracemalloc
from pathlib import Path

import pytest
import torch

from launcher.commands import ckpt as ckpt_cli
from sharded_ams import checkpoint as C
from sharded_ams.checkpoint import (CheckpointError, CheckpointManager, consolidate,
                                    find_latest_checkpoint, load_checkpoint,
                                    validate_checkpoint)

from ckpt_common import (GRAMS, NEW, OLD, SHARD, deadline, edit_shard, fresh, manifest_json,
                         rewrite_manifest, short_first_piece)


def resume_scan(run_dir: Path) -> tuple:
    """(source, step) of the launcher's resume point for a job whose run dir is ``run_dir``."""
    pytest.importorskip("ray.train")
    from launcher.config import load_config
    from launcher.run.driver import find_resume_point

    cfg = load_config(None, {"job.storage_path": str(run_dir.parent), "job.name": run_dir.name},
                      environ={})
    point = find_resume_point(cfg)
    return point.source, point.step


def assert_refused_everywhere(root: Path, *needles: str, shallow: bool = True) -> CheckpointError:
    """Every entry point refuses ``root/NEW`` with a CheckpointError whose message holds
    ``needles``, or skips it for ``root/OLD``; nothing hangs. ``shallow``: the problem is
    visible without checksums (``checksums=False`` refuses it too)."""
    bad = root / NEW
    with deadline(60, "an API call on a bad checkpoint"):
        for checksums in (True, False) if shallow else (True,):
            with pytest.raises(CheckpointError) as ei:
                validate_checkpoint(bad, checksums=checksums)
            for s in needles:
                assert s in str(ei.value), (s, str(ei.value))
            assert find_latest_checkpoint(root, checksums=checksums) == root / OLD
        if not shallow:
            assert validate_checkpoint(bad, checksums=False).step == 2
        model, opt = fresh()
        with pytest.raises(CheckpointError) as el:
            load_checkpoint(bad, opt, model=model)
        assert all(s in str(el.value) for s in needles), str(el.value)
        model, opt = fresh()
        assert CheckpointManager(root).load_latest(opt, model=model)["step"] == 1
        with pytest.raises(CheckpointError):
            consolidate(bad)
        assert ckpt_cli.main(["inspect", str(bad)]) == 1
        out = root.parent / "full.pt"
        assert ckpt_cli.main(["consolidate", str(bad), str(out)]) == 2 and not out.exists()
        assert not list(root.parent.glob("*.tmp"))
        # the launcher's scan checks sizes, not contents (the workers' load does that)
        assert resume_scan(root) == ("scan", 1 if shallow else 2)
    return ei.value


# ----------------------------------------------------------------------------- files
@pytest.mark.parametrize("victim", [SHARD, C.TRAINER_NAME, C.MANIFEST_NAME])
def test_symlinked_file_refused(root, victim):
    """A file that is a symlink to something outside (here: an exact copy, so sizes and
    checksums match) is refused, never read or copied into consolidate's output."""
    outside = root.parent / f"outside-{victim}"
    shutil.move(root / NEW / victim, outside)
    os.symlink(outside, root / NEW / victim)
    err = assert_refused_everywhere(root, victim, "symbolic link")
    assert err.kind == "unsafe"


def _plant(path: Path, what: str) -> None:
    path.unlink()
    if what == "fifo":
        os.mkfifo(path)
    elif what == "dev-zero":
        os.symlink("/dev/zero", path)
    else:  # the device node itself, as root could plant it
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 5))
        except PermissionError:
            pytest.skip("mknod needs CAP_MKNOD here")


@pytest.mark.parametrize("what,victim", [("fifo", SHARD), ("fifo", C.TRAINER_NAME),
                                         ("fifo", C.MANIFEST_NAME), ("dev-zero", SHARD),
                                         ("dev-zero", C.MANIFEST_NAME),
                                         ("char-device", C.MODEL_EXTRA_NAME)])
def test_fifo_or_device_never_hangs(root, what, victim):
    """A FIFO (whose open blocks until a writer comes) or /dev/zero (endless) placed as a
    file: every API call, both CLI commands and the resume scan return at once."""
    _plant(root / NEW / victim, what)
    err = assert_refused_everywhere(root, victim)
    assert err.kind == "unsafe"


# ----------------------------------------------------------------------------- sizes
def test_world_size_1e9_refused_without_allocating(root):
    """A 2 KB manifest claiming 10**9 ranks: refused from the shard entries it really
    lists, before anything of size world_size exists (peak Python memory stays small)."""
    rewrite_manifest(root / NEW, world_size=10**9)
    tracemalloc.start()
    try:
        with deadline(30, "find_latest_checkpoint"):
            assert find_latest_checkpoint(root, checksums=False) == root / OLD
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, peak
    err = assert_refused_everywhere(root, C.MANIFEST_NAME, "world_size 1000000000")
    assert err.kind == "format"


@pytest.mark.parametrize("claim", ["numel", "shape"])
def test_element_counts_checked_against_shape_and_file_sizes(root, claim):
    """2e9 elements claimed for a 256x32 param (pieces edited to match): refused because
    numel is not the product of the shape, or (shape edited too) because the shard file
    is far too small to hold them; consolidate never allocates for the claim."""
    man = manifest_json(root / NEW)
    big = 2_000_000_000
    man["params"]["wte.weight"]["numel"] = big
    if claim == "shape":
        man["params"]["wte.weight"]["shape"] = [big]
    pieces = man["files"][SHARD]["pieces"]
    pieces[[p[0] for p in pieces].index("wte.weight")][2] = big
    (root / NEW / C.MANIFEST_NAME).write_text(json.dumps(man))
    needle = ("params['wte.weight'].numel" if claim == "numel"
              else f"files['{SHARD}'].size")
    err = assert_refused_everywhere(root, C.MANIFEST_NAME, needle)
    assert err.field.startswith(needle.split(".")[0])


# ----------------------------------------------------------------------------- manifests
def _rename_param(man: dict, old: str, new: str) -> None:
    man["params"] = {new if k == old else k: v for k, v in man["params"].items()}
    for g in man["optimizer"]["param_groups"]:
        g["params"] = [new if n == old else n for n in g["params"]]
    for f in man["files"].values():
        for pc in f.get("pieces", ()):
            pc[0] = new if pc[0] == old else pc[0]
    for v in man["model"]["keys"].values():
        if v.get("param") == old:
            v["param"] = new


def _dup_param(man: dict) -> None:
    g = man["optimizer"]["param_groups"][0]
    g["params"].append(g["params"][0])


MANIFEST_CASES = {  # name: (edit, the field named in the error, a phrase of the message)
    "nul-in-name": (lambda m: _rename_param(m, "wte.weight", "wte\x00weight"),
                    "optimizer.param_groups[0].params[0]", "holds a NUL"),
    "missing-pieces": (lambda m: m["files"][SHARD].pop("pieces"),
                       f"files['{SHARD}'].pieces", "missing"),
    "piece-with-two-fields": (lambda m: m["files"][SHARD]["pieces"][0].pop(),
                              f"files['{SHARD}'].pieces[0]", "expected 3 items"),
    "size-big": (lambda m: m["files"][C.TRAINER_NAME].update(size="big"),
                 "files['trainer.pt'].size", "expected an integer"),
    "bad-dtype": (lambda m: m["params"]["wte.weight"].update(dtype="torch.Tensor"),
                  "params['wte.weight'].dtype", "is not one of"),
    "unknown-state": (lambda m: m["optimizer"]["state_keys"].append("evil"),
                      "optimizer.state_keys[3]", "unknown state"),
    "negative-lr": (lambda m: m["optimizer"]["param_groups"][0].update(lr=-5.0),
                    "optimizer.param_groups[0]", "Invalid learning rate: -5.0"),
    "param-twice": (_dup_param, "optimizer.param_groups[0].params", "listed twice"),
    "world-size-string": (lambda m: m.update(world_size="1"), "world_size",
                          "expected an integer"),
    # unhashable values where a name or dtype is looked up (a TypeError traceback before)
    "dtype-list": (lambda m: m["params"]["wte.weight"].update(dtype=["torch.float32"]),
                   "params['wte.weight'].dtype", "is not one of"),
    "piece-name-list": (lambda m: m["files"][SHARD]["pieces"][0].__setitem__(0, ["ln_f.bias"]),
                        f"files['{SHARD}'].pieces[0][0] (name)", "expected a string"),
    "model-param-dict": (lambda m: m["model"]["keys"]["wte.weight"].update(param={"a": 1}),
                         "model.keys['wte.weight'].param", "expected a string"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_malformed_manifest(root, case):
    """Each malformed manifest is a CheckpointError(kind="format") naming manifest.json
    and the field; the scans skip it and the manager falls back."""
    edit, fld, phrase = MANIFEST_CASES[case]
    man = manifest_json(root / NEW)
    edit(man)
    (root / NEW / C.MANIFEST_NAME).write_text(json.dumps(man))
    err = assert_refused_everywhere(root, C.MANIFEST_NAME, fld, phrase)
    assert err.kind == "format" and err.field == fld, (err.kind, err.field)


# ----------------------------------------------------------------------------- pieces
R0, R1 = C.shard_file_name(0, 2), C.shard_file_name(1, 2)


def _two_ranks(man: dict, ckpt: Path, rank1: list, moved: tuple = ()) -> None:
    """Re-list the one shard as rank 0 of 2, and a copy of it as rank 1 listing ``rank1``
    (the params in ``moved`` leave rank 0): every size and sha256 stays right."""
    entry = man["files"].pop(SHARD)
    os.rename(ckpt / SHARD, ckpt / R0)
    shutil.copyfile(ckpt / R0, ckpt / R1)
    man["world_size"] = 2
    man["files"][R0] = {**entry, "rank": 0,
                        "pieces": [pc for pc in entry["pieces"] if pc[0] not in moved]}
    man["files"][R1] = {**entry, "rank": 1, "pieces": rank1}


def _split_first_piece(man: dict, ckpt: Path) -> None:
    name, off, length = man["files"][SHARD]["pieces"].pop(0)
    man["files"][SHARD]["pieces"] += [[name, off, 1], [name, off + 1, length - 1]]


W = 256 * 32  # wte.weight's elements
PIECE_CASES = {  # name: (edit(manifest, checkpoint dir), the field, a phrase): each accepted before
    # the pieces of two files overlap, the tiling is otherwise complete (`a != pos` -> `a > pos`)
    "overlap": (lambda m, d: _two_ranks(m, d, [["wte.weight", 0, 10]]),
                f"files['{R0}'].pieces", "overlap another file's at element 0"),
    "zero-length": (lambda m, d: _two_ranks(m, d, [["wte.weight", 5, 0]]),
                    f"files['{R1}'].pieces[0][2] (length)", "a piece is never empty"),
    "empty-at-the-end": (lambda m, d: _two_ranks(m, d, [["wte.weight", W, 0]]),
                         f"files['{R1}'].pieces[0][1] (offset)", "a piece is never empty"),
    "one-param-twice-in-a-file": (
        lambda m, d: _two_ranks(m, d, [["wte.weight", 0, 10], ["wte.weight", 10, W - 10]],
                                moved=("wte.weight",)),
        f"files['{R1}'].pieces[1]", "a second piece of param 'wte.weight' in this file"),
    "more-pieces-than-params": (_split_first_piece, f"files['{SHARD}'].pieces",
                                "17 pieces for 16 params"),
}


@pytest.mark.parametrize("case", list(PIECE_CASES))
def test_pieces_tile_each_param_once_and_are_never_empty(root, case):
    """A save writes at most one non-empty piece per param per shard file (validate.py,
    ``_check_pieces``): overlapping, empty or surplus pieces are refused from the manifest
    alone, before any piece is used (a 49 MB manifest of 2.7M empty pieces passed)."""
    edit, fld, phrase = PIECE_CASES[case]
    man = manifest_json(root / NEW)
    edit(man, root / NEW)
    (root / NEW / C.MANIFEST_NAME).write_text(json.dumps(man))
    err = assert_refused_everywhere(root, C.MANIFEST_NAME, fld, phrase)
    assert err.kind == "format" and err.field == fld, (err.kind, err.field)


@pytest.mark.parametrize("bad", [NEW, OLD])
def test_deeply_nested_manifest_is_a_refusal_not_a_recursion_error(root, bad, capsys):
    """``[`` x 100,000 as a manifest (json.loads raises RecursionError): refused unparsed,
    naming the file; a bad older step does not stop the scans, resume or the CLI from
    using the newest; a nested writer-lock file is no owner."""
    (root / bad / C.MANIFEST_NAME).write_text("[" * 100_000)
    if bad == NEW:
        err = assert_refused_everywhere(root, C.MANIFEST_NAME, "nested deeper than 32 levels")
        assert err.kind == "format"
    else:
        with deadline(60, "a scan past a nested manifest"):
            assert find_latest_checkpoint(root) == root / NEW
            assert CheckpointManager(root).load_latest(fresh()[1])["step"] == 2
            assert resume_scan(root) == ("scan", 2)
            assert ckpt_cli.main(["inspect", str(root)]) == 0
            assert ckpt_cli.main(["consolidate", str(root), str(root.parent / "c.pt")]) == 0
    (root / C.LOCK_NAME).write_text("[" * 4000)
    assert C.manager.WriterLock(root).owner() is None


@pytest.mark.parametrize("chunk", [3, 8 << 20])
def test_nesting_depth_counts_brackets_outside_strings_only(monkeypatch, chunk):
    """The pre-parse measure is json.loads's depth: brackets inside strings (escaped
    quotes and backslashes too) do not count, across chunk boundaries; a name of 40 "["
    in a valid manifest is no refusal."""
    from sharded_ams.checkpoint import jsonread

    monkeypatch.setattr(jsonread, "_CHUNK", chunk)
    for doc, depth in [("[]", 1), ('{"a": [1, {"b": []}]}', 4), ('["[[[[", "]"]', 1),
                       (r'["\\", [["\"[[["]]]', 3), (r'{"k\"[": "\\\"[[]"}', 1),
                       ("[" * 40 + "]" * 40, 40), ('"' + "[" * 40 + '"', 0)]:
        json.loads(doc)
        assert jsonread.max_nesting_depth(doc.encode()) == depth, doc
    assert jsonread.max_nesting_depth(b"[" * 100_000, 32) > 32


def _deflate(fpath: Path) -> None:
    """Re-zip ``fpath`` with its records DEFLATE-compressed: torch.load reads it all the
    same (inflating each record), so a small file could hold a huge tensor (a zip bomb)."""
    import zipfile

    with zipfile.ZipFile(fpath) as z:
        records = [(i, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(fpath, "w") as z:
        for info, data in records:
            z.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)


@pytest.mark.parametrize("victim", [C.TRAINER_NAME, C.MODEL_EXTRA_NAME])
def test_compressed_zip_records_are_refused_unread(root, victim):
    """A file with compressed zip records (size and sha256 in the manifest agree) is
    refused before torch.load: file sizes bound what a load allocates (a 0.5 MB
    trainer.pt inflated to 512 MiB before). trainer.pt and model-extra.pt are read
    without mmap by a load; DCP's trainer.pt and rng files take the same path."""
    _deflate(root / NEW / victim)
    rewrite_manifest(root / NEW, files_from=(victim,))
    assert torch.load(root / NEW / victim, weights_only=True)  # torch itself inflates it
    err = assert_refused_everywhere(root, victim, "is compressed", shallow=False)
    assert err.kind == "corrupt"


# ----------------------------------------------------------------------------- contents
def _groups(obj: dict) -> dict:
    return obj["optimizer"]["param_groups"][0]


SHARD_CASES = {  # name: (edit, the field, a phrase of the message)
    "short-tensor": (short_first_piece, "optimizer.pieces[0].exp_avg", "expected a 1-D tensor"),
    "renamed-piece": (lambda o: o["optimizer"]["pieces"][0].update(name="lm_head.weight"),
                      "optimizer.pieces[0]", "the manifest says"),
    "other-lr": (lambda o: _groups(o).update(lr=0.5), "optimizer.param_groups",
                 "differ from the manifest's"),
    "lr-5": (lambda o: _groups(o).update(lr=-5.0), "optimizer.param_groups[0]",
             "Invalid learning rate: -5.0"),
    "betas": (lambda o: _groups(o).update(betas=(1.5, 2.0)), "optimizer.param_groups[0]",
              "Invalid beta parameter at index 0: 1.5"),
    "eps-0": (lambda o: _groups(o).update(eps=0.0), "optimizer.param_groups[0]",
              "Invalid epsilon value: 0.0"),
    "rng": (lambda o: o["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)), "rng",
            "not a valid RNG state"),
    "shape-an-int": (lambda o: o["optimizer"]["params"]["wte.weight"].update(shape=5),
                     "optimizer.params", "differ from the manifest's params"),
    "state-keys-an-int": (lambda o: o["optimizer"].update(state_keys=3), "optimizer.state_keys",
                          "the manifest says"),
    # read by ShardedAMS.load_state_dict: an AttributeError after the ranks agreed, and
    # 7 skipped steps loaded while inspect showed the manifest's 0
    "model-parallel": (lambda o: o["optimizer"].update(model_parallel="x"),
                       "optimizer.model_parallel", "holds no tensor-parallel state"),
    "skipped-steps": (lambda o: o["optimizer"].update(skipped_steps=7), "optimizer.skipped_steps",
                      "7, the manifest says 0"),
    "optimizer-rank": (lambda o: o["optimizer"].update(rank=1), "optimizer.rank",
                       "1, the manifest says 0"),
}


@pytest.mark.parametrize("case", list(SHARD_CASES))
def test_shard_content_disagrees_with_manifest(root, case):
    """A shard whose content disagrees with its manifest entry, checksums recomputed:
    a CheckpointError naming the shard and the field (never a raw RuntimeError, never
    a silent load of other hyperparameters), and load_latest falls back."""
    edit, fld, phrase = SHARD_CASES[case]
    edit_shard(root / NEW, SHARD, edit)
    err = assert_refused_everywhere(root, SHARD, fld, phrase, shallow=False)
    assert err.kind == "corrupt" and err.field == fld, (err.kind, err.field)


def test_scheduler_state_is_tried_before_anything_is_applied(root):
    """A saved scheduler state the scheduler rejects (``{}``: LambdaLR's KeyError) is a
    CheckpointError naming trainer.pt before the optimizer is touched (it used to be a
    KeyError after the optimizer state was overwritten: a half-applied load). It is not
    recoverable: the scheduler may be what differs, and load_latest must not skip every
    checkpoint then."""
    bad = root / NEW
    t = torch.load(bad / C.TRAINER_NAME, weights_only=True)
    t["lr_scheduler"] = {}
    torch.save(t, bad / C.TRAINER_NAME)
    rewrite_manifest(bad, files_from=(C.TRAINER_NAME,))
    model, opt = fresh()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(CheckpointError, match=r"trainer\.pt: field lr_scheduler: .*KeyError") as ei:
        load_checkpoint(bad, opt, model=model, lr_scheduler=sched)
    assert ei.value.kind == "scheduler_mismatch" and ei.value.field == "lr_scheduler"
    assert int(opt.param_groups[0]["step"]) == 0 and sched.last_epoch == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "half-applied"
    assert load_checkpoint(bad, opt, model=model)["step"] == 2  # the rest of it is sound
    model, opt = fresh()  # load_latest raises it: not skipped for the older checkpoint (no scheduler state)
    with pytest.raises(CheckpointError, match="field lr_scheduler") as ei:
        CheckpointManager(root).load_latest(opt, model=model,
                                            lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    assert ei.value.kind == "scheduler_mismatch"


def test_a_failure_after_the_checks_is_a_checkpoint_error(root, monkeypatch):
    """Whatever a rule missed and fails once the ranks agreed the files are good is still a
    CheckpointError naming the checkpoint (load_latest can tell it), not a raw error."""
    model, opt = fresh()

    def broken(sds):
        raise AttributeError("'str' object has no attribute 'items'")

    monkeypatch.setattr(opt, "load_state_dict", broken)
    with pytest.raises(CheckpointError, match="failed after every check passed .*AttributeError"):
        load_checkpoint(root / NEW, opt, model=model)


def test_load_state_dict_validates_hyperparameters():
    """ShardedAMS.load_state_dict checks saved hyperparameters as the constructor does,
    before it changes anything."""
    model, opt = fresh()
    for bad, msg in (({"lr": -5.0}, "Invalid learning rate: -5.0"),
                     ({"betas": (1.5, 2.0)}, "Invalid beta parameter at index 0: 1.5"),
                     ({"eps": 0.0}, "Invalid epsilon value: 0.0")):
        sd = opt.state_dict()
        sd["param_groups"][0].update(bad)
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(".", r"\.")):
            opt.load_state_dict(sd)
        assert opt.param_groups[0]["lr"] == GRAMS["lr"] and opt.param_groups[0]["eps"] == 1e-8


def test_inspect_shows_what_a_load_applies(root, capsys):
    """``inspect`` shows the hyperparameters and step that load_checkpoint applies."""
    assert ckpt_cli.main(["inspect", str(root / NEW), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    model, opt = fresh(**{})
    for g in opt.param_groups:
        g.update(lr=0.5, weight_decay=0.0)
    load_checkpoint(root / NEW, opt, model=model)
    assert info["step"] == opt.param_groups[0]["step"] == 2
    for shown, g in zip(info["hyperparameters"], opt.param_groups):
        for k in ("lr", "beta3", "lam", "eps", "weight_decay", "step"):
            assert shown[k] == g[k], k
        assert tuple(shown["betas"]) == g["betas"]


# ----------------------------------------------------------------------------- values
def _poke(key: str, value: float, where: int = 3):
    def edit(obj: dict) -> None:
        obj["optimizer"]["pieces"][0][key][where] = value
    return edit


VALUE_CASES = {  # name: (shard edit, the field named, a phrase): each loaded silently before
    "nan-master": (_poke("master", float("nan")), "optimizer.pieces[0].master",
                   "1 non-finite values (NaN/inf)"),
    "inf-exp-avg": (_poke("exp_avg", float("-inf")), "optimizer.pieces[0].exp_avg",
                    "1 non-finite values (NaN/inf)"),
    "negative-exp-avg-sq": (_poke("exp_avg_sq", -1e-3), "optimizer.pieces[0].exp_avg_sq",
                            "1 negative values"),
}


@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_nonfinite_or_negative_state_is_reported_and_refused(root, case, capsys):
    """The checkpoint is intact (validate_checkpoint passes, retention keeps it) but holds
    state no sound step saves: ``inspect`` lists it (JSON ``unsound_values``, and a line)
    and says a load refuses it; load_checkpoint and consolidate refuse it naming the param
    and state key, before the optimizer changes; load_latest falls back;
    ``allow_nonfinite=True`` loads it."""
    edit, fld, phrase = VALUE_CASES[case]
    bad = root / NEW
    edit_shard(bad, SHARD, edit)
    assert validate_checkpoint(bad).step == 2
    assert ckpt_cli.main(["inspect", str(bad), "--json"]) == 1
    info = json.loads(capsys.readouterr().out)
    key = fld.rsplit(".", 1)[1]
    assert not info["valid"] and phrase in info["reason"] and "allow_nonfinite" in info["reason"]
    assert [(u["param"], u["key"]) for u in info["unsound_values"]] == [("ln_f.bias", key)]
    assert ckpt_cli.main(["inspect", str(bad)]) == 1
    assert f"unsound:    {SHARD}: {key} of ln_f.bias [0, 32)" in capsys.readouterr().out
    model, opt = fresh()
    before = model.ln_f.bias.detach().clone()
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(bad, opt, model=model)
    msg = str(ei.value)
    assert ei.value.kind == "values" and ei.value.field == fld, (ei.value.kind, ei.value.field)
    assert SHARD in msg and fld in msg and "'ln_f.bias'" in msg and phrase in msg, msg
    assert len(msg.splitlines()) == 1 and torch.equal(model.ln_f.bias, before)
    with pytest.raises(CheckpointError, match="ln_f.bias"):
        consolidate(bad)
    assert CheckpointManager(root).load_latest(fresh()[1])["step"] == 1
    model, opt = fresh()
    assert load_checkpoint(bad, opt, model=model, allow_nonfinite=True)["step"] == 2
    assert consolidate(bad, allow_nonfinite=True)["step"] == 2


def test_zero_second_moment_is_sound(root, capsys):
    """An exp_avg_sq of 0 (or -0.0: a param that never had a gradient) is what training
    saves: inspect calls it valid and it loads."""
    edit_shard(root / NEW, SHARD, lambda o: (_poke("exp_avg_sq", 0.0, 3)(o),
                                             _poke("exp_avg_sq", -0.0, 4)(o)))
    assert ckpt_cli.main(["inspect", str(root / NEW), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unsound_values"] == []
    model, opt = fresh()
    assert load_checkpoint(root / NEW, opt, model=model)["step"] == 2


# ----------------------------------------------------------------------------- pruning
