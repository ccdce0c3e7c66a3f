"""The engine's loop: exact resume, accumulation, EMA, the NaN guard, checkpoints."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from medfm.engine import (
    Dist,
    Engine,
    EngineConfig,
    NonFiniteLoss,
    lr_factor,
    read_checkpoint,
    saved_checkpoints,
)
from medfm.errors import MedfmError

from .tiny import LinearTask

ONE = Dist(0, 1, torch.device("cpu"))


def _engine(out, task=None, **kw) -> Engine:
    cfg = dict(out=str(out), steps=6, lr=0.3, warmup=1, checkpoint_every=2, keep_checkpoints=5)
    cfg.update(kw)
    return Engine(task or LinearTask(ONE), EngineConfig(**cfg), dist=ONE)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_killed_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    full = _engine(tmp_path / "full", ema_decay=0.9)
    full.run()

    def kill_at_3(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _engine(tmp_path / "killed", ema_decay=0.9).run(progress=kill_at_3)
    resumed = _engine(tmp_path / "killed", ema_decay=0.9)
    assert resumed.resume() and resumed.step == 2
    resumed.run()
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "full" / "model" / name))
        b = load_file(str(tmp_path / "killed" / "model" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert [m["step"] for m in _metrics(tmp_path / "killed")] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in _metrics(tmp_path / "full")] == [
        m["loss"] for m in _metrics(tmp_path / "killed")
    ]
    # the learning rate follows warm-up + cosine, and the loss goes down
    m = _metrics(tmp_path / "full")
    assert [x["lr"] for x in m] == pytest.approx([0.3 * lr_factor(s, 1, 6) for s in range(1, 7)])
    assert m[-1]["loss"] < m[0]["loss"]


def test_checkpoints_hold_the_step_the_optimizer_and_ema_and_old_ones_are_pruned(tmp_path):
    engine = _engine(tmp_path / "run", ema_decay=0.5, keep_checkpoints=2)
    engine.run()
    done = saved_checkpoints(tmp_path / "run")
    assert [p.name for p in done] == ["step_0000004", "step_0000006"]
    ck = read_checkpoint(done[-1])
    assert ck.step == 6 and set(ck.weights) == {"weight", "bias"}
    assert torch.equal(ck.weights["weight"], engine.task.module.weight.detach())
    assert len(ck.optimizer["state"]) == 2 and ck.scheduler["last_epoch"] == 6
    # EMA: the shadow moved from the initial weights towards the trained ones, not onto them
    ema, w = ck.ema["weight"], engine.task.module.weight.detach()
    assert not torch.equal(ema, w) and float((ema - w).abs().max()) < 1.0
    assert json.loads((done[-1] / "config.json").read_text()) == {"kind": "linear"}


def test_ema_follows_diffusers_warm_up():
    from medfm.engine import EMA

    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("p", p)], decay=0.99)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update(0)  # decay min(0.99, 1/10) = 0.1: the shadow moves 90% of the way
    assert torch.allclose(ema.shadow[0], torch.full((3,), 0.9))
    assert ema.decay_at(10_000) == 0.99


def test_accumulated_micro_steps_sum_into_one_update(tmp_path):
    """accumulate=2: one optimizer step on the mean gradient of micro-steps 2s and 2s + 1,
    each drawn from its own generator."""
    from medfm.engine import step_generator

    engine = _engine(tmp_path / "acc", accumulate=2, steps=1, lr=0.1, warmup=0)
    task = engine.task
    grads = []
    for micro in (0, 1):
        task.module.zero_grad()
        loss, _ = task.step(task.module, micro, step_generator(0, micro))
        loss.backward()
        grads.append(task.module.weight.grad.clone())
    task.module.zero_grad()
    engine.train_step(0)
    # AdamW's first step moves each weight by lr * sign(grad) (plus weight decay)
    want = torch.sign((grads[0] + grads[1]) / 2)
    moved = LinearTask(ONE).module.weight.detach() - task.module.weight.detach()
    assert torch.equal(torch.sign(moved), want)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    engine = _engine(out, task=LinearTask(ONE, nan_at=4))
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at step 5: .*step_0000004"):
        engine.run()
    done = saved_checkpoints(out)
    assert [p.name for p in done] == ["step_0000002", "step_0000004"]
    for ck in done:
        assert all(torch.isfinite(t).all() for t in read_checkpoint(ck).weights.values())
    assert not (out / "model").exists()
    assert torch.isfinite(engine.task.module.weight).all()  # the NaN step never updated


def test_an_infinite_gradient_is_refused_before_the_update(tmp_path):
    engine = _engine(tmp_path / "inf")
    before = engine.task.module.weight.detach().clone()
    engine.task.module.weight.register_hook(lambda g: g * math.inf)
    with pytest.raises(NonFiniteLoss, match="gradient norm is .* at step 1: .*no checkpoint"):
        engine.train_step(0)
    assert torch.equal(engine.task.module.weight.detach(), before)


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda ck: (ck / "state.json").write_text('{"step": 4, "optim'), "state.json"),
        (lambda ck: (ck / "model.safetensors").write_bytes(b"\x10\x00"), "model.safetensors"),
        (
            lambda ck: save_file({"0.exp_avg": torch.zeros(3)}, str(ck / "optimizer.safetensors")),
            "optimizer.safetensors",
        ),
    ],
)
def test_a_damaged_latest_checkpoint_is_named_and_an_older_one_resumes(tmp_path, damage, named):
    full = _engine(tmp_path / "full")
    full.run()
    with pytest.raises(KeyboardInterrupt):
        _engine(tmp_path / "run").run(progress=_kill_at(5))
    damage(tmp_path / "run" / "checkpoints" / "step_0000004")
    notes = []
    engine = Engine(LinearTask(ONE), _engine(tmp_path / "run").cfg, dist=ONE, log=notes.append)
    assert engine.resume() and engine.step == 2
    assert any(named in n and "older checkpoint" in n for n in notes), notes
    engine.run()
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the steps after step 2 trained again
    # nothing readable: one line naming the problem
    for ck in saved_checkpoints(tmp_path / "run"):
        (ck / "state.json").write_text("{")
    with pytest.raises(MedfmError, match=r"no checkpoint of .* can be read: .*state.json"):
        _engine(tmp_path / "run").resume()


def _kill_at(step):
    def progress(s, metrics):
        if s == step:
            raise KeyboardInterrupt

    return progress
