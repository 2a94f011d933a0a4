"""GRPO and its variants: advantages, the clipped objectives and the KL term against values
worked out by hand."""

import math

import pytest
import torch

from stalwart.rl.objective import group_advantages, informative, k3, policy_loss

LN = math.log


def test_advantages_are_relative_to_the_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    # mean 0.5; std with Bessel's correction sqrt(4 * 0.25 / 3) = 0.57735
    assert torch.allclose(group_advantages(rewards, "grpo")[0], torch.tensor([1, -1, -1, 1]) * 0.5 / (0.57735 + 1e-4),
                          atol=1e-5)
    assert torch.equal(group_advantages(rewards, "grpo")[1], torch.zeros(4))  # all equal: no signal, no nan
    assert torch.equal(group_advantages(rewards, "dr_grpo")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert informative(rewards).tolist() == [True, False]


# Two completions, three token slots; the first has two tokens. Ratios exp(logp - old):
# completion 0 (advantage +1): 1.5, 0.9;  completion 1 (advantage -1): 0.7, 1.1, 1.3.
# Per-token losses with eps 0.2: -min(1.5, 1.2) = -1.2 (clipped), -0.9; then for A = -1:
# -min(-0.7, -0.8) = 0.8 (clipped), 1.1, -min(-1.3, -1.2) = 1.3 (not clipped).
RATIOS = torch.tensor([[1.5, 0.9, 1.0], [0.7, 1.1, 1.3]])
MASK = torch.tensor([[True, True, False], [True, True, True]])
ADVANTAGES = torch.tensor([1.0, -1.0])


@pytest.mark.parametrize("loss, expected", [
    ("grpo", ((-1.2 - 0.9) / 2 + (0.8 + 1.1 + 1.3) / 3) / 2),  # each completion's mean, then the mean
    ("dapo", (-1.2 - 0.9 + 0.8 + 1.1 + 1.3) / 5),  # the mean over the batch's tokens
    ("dr_grpo", (-1.2 - 0.9 + 0.8 + 1.1 + 1.3) / (2 * 4)),  # over completions x the allowed length 4
])
def test_each_variant_averages_the_clipped_objective_its_own_way(loss, expected):
    old = torch.full((2, 3), LN(0.3))
    out = policy_loss(old + RATIOS.log(), old, ADVANTAGES, MASK, loss=loss, max_len=4)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.clip_fraction == pytest.approx(2 / 5) and out.kl == 0


def test_dapo_clips_higher_than_lower():
    old = torch.zeros(1, 1)
    up = policy_loss(old + LN(1.25), old, torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool), loss="dapo",
                     clip_low=0.2, clip_high=0.28)
    assert up.loss.item() == pytest.approx(-1.25) and up.clip_fraction == 0  # 1.25 is inside 1 + 0.28


def test_the_kl_term_is_k3_against_the_reference():
    logp, ref = torch.tensor([[LN(0.5)]]), torch.tensor([[LN(0.25)]])
    # k3 = exp(ref - logp) - (ref - logp) - 1 = 0.5 + ln 2 - 1
    assert k3(logp, ref).item() == pytest.approx(0.5 + LN(2) - 1)
    out = policy_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1, dtype=torch.bool), loss="grpo",
                      ref_logp=ref, kl_coef=0.1)
    assert out.loss.item() == pytest.approx(0.1 * (0.5 + LN(2) - 1)) and out.kl == pytest.approx(0.5 + LN(2) - 1)
    assert k3(logp, logp).item() == 0


def test_the_gradient_moves_probability_towards_positive_advantages():
    logp = torch.tensor([[LN(0.4)], [LN(0.4)]], requires_grad=True)
    out = policy_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 1, dtype=torch.bool), loss="grpo")
    out.loss.backward()
    assert logp.grad[0, 0] < 0 < logp.grad[1, 0]  # descending raises the first, lowers the second


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo"])
def test_shares_weighted_as_the_objective_says_add_up_to_the_whole_batch(loss):
    # A step cut into shares (rl/shares.py): sum(weight x loss) / sum(weight) over the shares
    # is the whole batch's loss, for each variant, and so are the clip fraction and the KL.
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(6, 5, generator=g) - 2
    old, ref = logp + 0.3 * torch.randn(6, 5, generator=g), logp + 0.1 * torch.randn(6, 5, generator=g)
    advantages, mask = torch.randn(6, generator=g), torch.rand(6, 5, generator=g) > 0.3
    mask[:, 0] = True
    kwargs = dict(loss=loss, max_len=5, kl_coef=0.05)
    whole = policy_loss(logp, old, advantages, mask, ref_logp=ref, **kwargs)
    parts = [policy_loss(logp[a:b], old[a:b], advantages[a:b], mask[a:b], ref_logp=ref[a:b], **kwargs)
             for a, b in ((0, 2), (2, 6))]
    weight = sum(part.weight for part in parts)
    assert sum(part.loss.item() * part.weight for part in parts) / weight == pytest.approx(whole.loss.item(), rel=1e-6)
    tokens = sum(part.tokens for part in parts)
    assert sum(part.clipped for part in parts) / tokens == pytest.approx(whole.clip_fraction) and whole.clip_fraction > 0
    assert sum(part.kl_sum for part in parts) / tokens == pytest.approx(whole.kl) and whole.kl > 0


def test_the_exchange_gives_the_same_update_whoever_computed_each_share():
    from stalwart.rl.shares import ShareExchange, share_bounds, shares_of

    params = [torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)]
    g = torch.Generator().manual_seed(1)
    grads = {0: [torch.randn(3, generator=g), None], 1: [torch.tensor([-0.0, 1.5, 2.0]), torch.randn(2, generator=g)],
             2: [torch.randn(3, generator=g), None]}

    def put(exchange, share, replica):
        for p, grad in zip(params, grads[share]):
            p.grad = grad
        exchange.put(share, {"weight": float(share + 1), "weighted_loss": 0.1 * share}, share * 2,
                     {"reward": torch.tensor([share, share + 0.5])}, replica=replica)

    alone = ShareExchange(params, 3, 6)  # one group computed every share
    for share in range(3):
        put(alone, share, 0)
    parts = []  # three groups, one share each, summed as the all-reduce sums them
    for share in (2, 0, 1):
        parts.append(ShareExchange(params, 3, 6))
        put(parts[-1], share, share)
    together = ShareExchange(params, 3, 6)
    together.buffer = parts[0].buffer + parts[1].buffer + parts[2].buffer
    updates = []
    for exchange in (alone, together):
        assert exchange.unclaimed() == []
        exchange.set_gradients()
        updates.append([p.grad.clone() for p in params])
        assert exchange.sums()["weight"] == 6 and exchange.slots("reward").tolist() == [0, 0.5, 1, 1.5, 2, 2.5]
    assert all(torch.equal(a, b) and a.view(-1)[0].item() == b.view(-1)[0].item() for a, b in zip(*updates))
    assert torch.equal(updates[0][1], grads[1][1] / 6)  # only share 1 had a gradient for it
    assert alone.computed_by() == [0, 0, 0] and together.computed_by() == [0, 1, 2]
    twice = ShareExchange(params, 3, 6)
    twice.buffer = parts[0].buffer + parts[1].buffer + parts[1].buffer  # share 0 twice, share 1 never
    assert twice.unclaimed() == [0, 1]
    assert [shares_of(p, 2, 3) for p in range(2)] == [[0, 2], [1]]
    assert [list(share_bounds(8, 3, s)) for s in range(3)] == [[0, 1], [2, 3, 4], [5, 6, 7]]


# `stalwart rl` end to end, on a small model trained here first.

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from jobs import in_process  # noqa: E402
from stalwart.recipes import recipe  # noqa: E402

RL = ["--rl.prompts", "8", "--rl.group_size", "8", "--rl.max_new_tokens", "20", "--eval.problems", "32",
      "--data.min_digits", "1", "--data.max_digits", "1", "--train.log_every", "100"]


def stalwart(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stalwart", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The smoke model after 300 steps of 1-digit addition: it answers in the right form, and
    rightly about one time in seven when sampled."""
    run = tmp_path_factory.mktemp("sft") / "run"
    r = stalwart("train", "--recipe", "smoke", "--out", str(run), "--quiet", "--train.steps", "300",
                 "--data.min_digits", "1", "--data.max_digits", "1", "--eval.problems", "0")
    assert r.returncode == 0, r.stderr
    return run


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_reward_rises_and_a_killed_run_repeats_the_uninterrupted_one(trained, tmp_path):
    ref = tmp_path / "ref"
    r = stalwart("rl", "--from", str(trained), "--out", str(ref), *RL, "--train.steps", "50", "--json")
    assert r.returncode == 0, r.stderr
    summary, curve = json.loads(r.stdout), metrics(ref)
    assert [m["step"] for m in curve] == list(range(1, 51))
    first, last = (sum(m["accuracy"] for m in part) / len(part) for part in (curve[:10], curve[-30:]))
    assert last > first + 0.02, (first, last)
    assert summary["pass_at_8"] > summary["pass_at_8_before"]
    assert {"eval_exact_match_before", "eval_exact_match", "pass_at_8_before", "pass_at_8"} <= set(summary)
    report = (ref / "report.md").read_text()  # the run's report, with the RL rows and panels
    assert (ref / "report.png").stat().st_size > 10_000 and "| reward |" in report and "| pass@8 |" in report
    for key in ("reward_std", "accuracy", "zero_variance_groups", "completion_length", "entropy", "kl",
                "clip_fraction", "generation_s", "scoring_s", "update_s", "sampler_logprob_gap", "routing_mismatch"):
        assert key in curve[0], key
    # Killed from outside at no step of its choosing, then resumed: the same curve, step for step.
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "stalwart", "rl", "--from", str(trained), "--out", str(run), *RL,
                             "--train.steps", "50", "--checkpoint.every", "10", "--quiet"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run / "metrics.jsonl").exists() or len(metrics(run)) < 23:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = stalwart("rl", "--out", str(run), "--resume", "--quiet")
    assert r.returncode == 0, r.stderr
    assert [(m["step"], m["reward_mean"], m["loss"]) for m in metrics(run)] == \
        [(m["step"], m["reward_mean"], m["loss"]) for m in curve]


def test_several_updates_with_routing_replay_score_the_sampling_policy_first(trained, tmp_path):
    # Two updates per batch, routed as sampled: the first update's ratio is exactly 1 (the
    # sampling policy's log-probabilities were scored before it, with the same routing), the
    # last has moved; the mismatch is logged before and after.
    r = in_process("rl", "--from", str(trained), "--out", str(tmp_path / "rl"), *RL, "--train.steps", "3",
                   "--rl.updates", "2", "--rl.routing_replay", "true", "--optim.lr", "1e-2", "--eval.problems", "4",
                   "--train.report", "false", "--quiet")
    assert r.returncode == 0, r.stderr
    curve = metrics(tmp_path / "rl")
    assert [m["step"] for m in curve] == [1, 2, 3]
    assert all(m["clip_fraction"] == 0 and m["routing_mismatch"] == 0 for m in curve)
    assert any(m["clip_fraction_last"] > 0 for m in curve) and all("routing_mismatch_last" in m for m in curve)


@pytest.mark.parametrize("extra, words", [
    (["--rl.group_size", "1"], "rl.group_size must be >= 2"),
    (["--data.task", "files", "--data.files", "x.txt"], "needs a task with a scorer"),
    (["--rl.loss", "ppo"], "rl.loss must be one of grpo, dr_grpo, dapo"),
    (["--replicas", "9"], "rl.prompts 8 must be at least replicas.count 9"),
    (["--replicas", "2", "--replicas.ranks_per_group", "2"], "replica groups of one rank each"),
    (["--replica-id", "0"], "--replica-id needs --lighthouse URL and --out RUN_DIR"),
])
def test_bad_input_is_one_clear_line(trained, tmp_path, extra, words):
    r = in_process("rl", "--from", str(trained), "--out", str(tmp_path / "rl"), *extra)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
    assert not (tmp_path / "rl").exists()


def test_a_run_directory_without_a_trained_model_is_one_clear_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(recipe("smoke").to_json())  # a run that never checkpointed
    r = in_process("rl", "--from", str(tmp_path / "empty"), "--out", str(tmp_path / "rl"))
    assert r.returncode == 2 and "has no good checkpoint yet" in r.stderr, r.stderr
    r = in_process("rl", "--out", str(tmp_path / "rl"))
    assert r.returncode == 2 and "--from RUN_DIR|FOLDER is required" in r.stderr


def test_the_trainer_scores_what_the_sampler_sampled_whatever_the_prompt_lengths(trained):
    from stalwart.data.tasks import make_problem
    from stalwart.model_source import open_model
    from stalwart.rl.loop import completion_logprobs, rl_config, sample

    cfg = rl_config(str(trained), {"rl.group_size": "3", "rl.max_new_tokens": "12", "data.min_digits": "1",
                                   "data.max_digits": "3"})
    model, tokenizer = open_model(str(trained))
    problems = [make_problem("addition", "train", i, 0, width, width) for i in range(4) for width in (1, 3)]
    r = sample(cfg, model, tokenizer, problems, seed=1)
    assert len({len(p) for p in r.prompt_ids}) > 1  # "7+3=" beside "047+365="
    with torch.no_grad():
        scores = completion_logprobs(model, r, model.cfg.pad_token_id)
    for i, lp in enumerate(r.sampler_logprobs):
        assert scores.mask[i].sum() == len(lp)
        assert torch.allclose(scores.logp[i, :len(lp)], torch.tensor(lp), atol=1e-4)
    assert scores.routing_mismatch == 0  # the same weights route the same, cache or none

    # The routing bias decides which experts compute and never how much they count: moved
    # far, it changes every choice it can, and replaying the sampled routing gives back the
    # sampler's log-probabilities exactly, which scoring with the new routing does not.
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.copy_(torch.linspace(1, -1, moe.cfg.n_routed_experts))
    with torch.no_grad():
        rerouted = completion_logprobs(model, r, model.cfg.pad_token_id)
        replayed = completion_logprobs(model, r, model.cfg.pad_token_id, replay=True)
    assert rerouted.routing_mismatch > 0.2 and replayed.routing_mismatch == rerouted.routing_mismatch
    scored = scores.mask
    assert torch.equal(replayed.logp[scored], scores.logp[scored])
    assert not torch.allclose(rerouted.logp[scored], scores.logp[scored], atol=1e-2)


REPLICAS = [*RL, "--train.steps", "80", "--rl.updates", "2", "--replicas", "3", "--replicas.timeout_s", "3",
            "--replicas.heartbeat_timeout_s", "1", "--checkpoint.every", "4", "--guards.fingerprint_every", "1",
            "--train.report", "false", "--quiet"]


def by_step(run) -> dict[int, set]:
    """{step: the distinct (reward, loss, grad norm, last update's clip fraction, fingerprint of
    the weights and AdamW state it started from) its groups recorded}."""
    steps: dict[int, set] = {}
    for m in metrics(run):
        steps.setdefault(m["step"], set()).add((m["reward_mean"], m["loss"], m["grad_norm"], m["clip_fraction_last"],
                                                m["fingerprint"]))
    return steps


@pytest.mark.slow
def test_replica_groups_killed_anywhere_repeat_the_uninterrupted_curve(trained, tmp_path):
    # Three groups, each computing its share of every step's prompts, two updates per step.
    ref = tmp_path / "ref"
    r = stalwart("rl", "--from", str(trained), "--out", str(ref), *REPLICAS, "--json")
    assert r.returncode == 0, r.stderr
    reference, final = by_step(ref), json.loads(r.stdout)
    assert sorted(reference) == list(range(1, 81)) and all(len(v) == 1 for v in reference.values())
    assert all(m["shares"] == [0, 1, 2] and m["participants"] == 3 for m in metrics(ref))

    # Then killed: group 1 while it samples step 4, group 2 while it scores step 34, group 0
    # (the checkpoint writer) in the second update of step 64, its first applied (each
    # restarted group is back and healed before the next kill); a bit of group 2's weights
    # flipped after step 20; group 0's gradients NaN at step 48; the Lighthouse once all three train again; group 1 again from
    # outside at no step of its choosing; then the supervisor (its groups follow it), and
    # the run resumed.
    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "STALWART_INJECT": "kill-in-generation@4:1,flip-bit@20:2,kill-in-scoring@34:2,nan-grad@48:0,"
                              "kill-in-update@64:0"}
    proc = subprocess.Popen([sys.executable, "-m", "stalwart", "rl", "--from", str(trained), "--out", str(run),
                             *REPLICAS], env=env, stderr=subprocess.PIPE, text=True)

    def events() -> list[dict]:
        return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]

    def wait_until(what: str, done) -> None:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").exists() and done(metrics(run))):
            assert time.monotonic() < deadline and proc.poll() is None, f"not within 120 s: {what}"
            time.sleep(0.02)

    try:
        wait_until("three groups after the first kill", lambda ms: any(m["step"] > 10 and m["participants"] == 3
                                                                        for m in ms))
        os.kill([e["pid"] for e in events() if e["event"] == "lighthouse_start"][-1], signal.SIGKILL)
        wait_until("step 70", lambda ms: any(m["step"] >= 70 for m in ms))
        time.sleep(0.05 + 0.1 * (os.getpid() % 7) / 7)  # somewhere inside a step
        os.kill([e["pid"] for e in events() if e["event"] == "group_start" and e["replica"] == 1][-1], signal.SIGKILL)
        wait_until("step 74", lambda ms: any(m["step"] >= 74 for m in ms))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    time.sleep(2.5)  # the groups notice their supervisor is gone within a second or two
    r = stalwart("rl", "--out", str(run), "--resume", "--json")
    assert r.returncode == 0, r.stderr
    assert by_step(run) == reference
    seen = events()
    exits = [(e["replica"], e["signal"]) for e in seen if e["event"] == "group_exit"]
    assert [replica for replica, _ in exits[:4]] == [1, 2, 0, 1] and {s for _, s in exits} == {"SIGKILL"}, exits
    healed = [e["replica"] for e in seen if e["event"] == "heal" and e["step"] > 0]
    assert healed.count(0) >= 1 and healed.count(1) >= 1 and healed.count(2) >= 2, healed  # restarted, and the flip
    assert [(e["step"], e["replicas"]) for e in seen if e["event"] == "sdc_detected"] == [(21, [2])]
    assert [(e["step"], e["replica"]) for e in seen if e["event"] == "step_corrupt"] == [(48, 0)]
    assert sum(e["event"] == "lighthouse_exit" for e in seen) == 1 and any(e["event"] == "lighthouse_back" for e in seen)
    # The lost shares were computed again by the survivors: some step has a share of a group
    # that was not its own.
    assert any(m["shares"] != [0, 1, 2] for m in metrics(run))
    summary = json.loads(r.stdout)
    assert summary["steps"] == 80 and summary["restarts"] == 0  # the resumed job's own
    assert {k: summary[k] for k in ("eval_exact_match", "pass_at_8")} == \
        {k: final[k] for k in ("eval_exact_match", "pass_at_8")}
