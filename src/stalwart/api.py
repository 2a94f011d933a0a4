"""The Python API: what the `stalwart` command does, as three functions (docs/api.md).

    import stalwart

    summary = stalwart.train("smoke", out="runs/api", train={"steps": 50})
    model = stalwart.load(summary["export"])
    print(stalwart.generate(model, "12+34="))

`train` takes what `stalwart train` takes (a recipe, a TOML file, overrides by section)
and runs the same code: one process, or replica groups under a supervisor on this machine
when `replicas={"count": N}`. Bad input raises `stalwart.errors.UserError` with the line the
command would print.
"""

from __future__ import annotations

import dataclasses
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stalwart.errors import ConfigError, UserError

if TYPE_CHECKING:
    from stalwart.config import RunConfig
    from stalwart.model import DeepSeekForCausalLM


def run_config(start: str | RunConfig | None, settings: dict[str, Any], *, resume_from: Path | None = None,
               track: tuple[str, ...] | None = None) -> RunConfig:
    """The run's config: `start` (a recipe name, default "default", or a RunConfig) or,
    resuming, the run's own config.json, with
    `settings` ({"section.key": value}, text or typed) on top, and the tracking sinks; a
    fresh run takes data.tokenizer's special ids. A resume refuses settings that would not
    continue the same run."""
    from stalwart.config import RESUMABLE_OVERRIDES, RunConfig, apply_overrides, read_run_config, validate
    from stalwart.data.sources import with_tokenizer
    from stalwart.recipes import recipe

    if resume_from is not None:
        cfg = read_run_config(resume_from / "config.json")
        recipe_name = start.recipe if isinstance(start, RunConfig) else start
        if recipe_name and recipe_name != cfg.recipe:  # a restart's command line names the run's own
            raise UserError(f"--resume continues the run's own config (recipe {cfg.recipe}); --recipe does not apply")
        # A fixed key given again with the run's own value (a launch script's --replicas N) is no change.
        fixed = sorted(k for k in set(settings) - set(RESUMABLE_OVERRIDES)
                       if apply_overrides(cfg, {k: settings[k]}) != cfg)
        if fixed:
            raise UserError(f"--resume cannot change {', '.join(fixed)} (it may change: "
                            f"{', '.join(RESUMABLE_OVERRIDES)})")
    else:
        cfg = start if isinstance(start, RunConfig) else recipe(start or "default")
    cfg = apply_overrides(cfg, settings)
    if track is not None:  # a resumed run may change its sinks: metrics.jsonl is the record
        cfg = validate(dataclasses.replace(cfg, track=track))
    if resume_from is None:  # a resumed run keeps the special ids it was started with
        cfg = with_tokenizer(cfg, set(settings))
    return cfg


def check_out(out: Path, *, resume: bool) -> None:
    """Refuse a run directory that is a file, or that holds a run not being resumed."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a run directory")
    if not resume and (out / "config.json").exists():
        raise UserError(f"{out} already holds a run: pass --resume to continue it, or another --out")


def run_on_this_machine(cfg: RunConfig, out: Path, *, resume: bool, quiet: bool) -> dict[str, Any]:
    """Train in this process, or as cfg.replicas.count groups under a supervisor with a
    Lighthouse on loopback; the run's summary."""
    from stalwart.run.tracking import require_sinks

    require_sinks(cfg.track)
    if cfg.replicas.count == 1:
        from stalwart.training.loop import train as train_here

        return train_here(cfg, out, resume=resume, quiet=quiet).summary
    from stalwart.replication.supervisor import supervise
    from stalwart.replication.transport import job_secret, new_job_secret

    secret, previous = job_secret(), signal.getsignal(signal.SIGTERM)
    try:
        return supervise(cfg, out, resume=resume, quiet=quiet, secret=secret.hex() if secret else new_job_secret())
    finally:  # the supervisor ends its groups on SIGTERM; the caller's handler comes back
        signal.signal(signal.SIGTERM, previous)


def train(config: RunConfig | str | Path | None = None, *, out: str | Path, resume: bool = False,
          quiet: bool = True, **sections: dict[str, Any]) -> dict[str, Any]:
    """Train and return the run's summary (summary.json's fields).

    `config`: a recipe name ("default", "smoke", ...), a TOML file (.toml; `stalwart config
    show` lists its keys) or a RunConfig; `sections`: overrides by section, e.g.
    `train={"steps": 100}, data={"task": "files", "files": ["corpus.parquet"]}`, applied on
    top as `--train.steps 100` would be. `resume` continues the run in `out`."""
    from stalwart.config_file import read_config_file

    settings: dict[str, Any] = {}
    start, track, given = config, None, None
    if isinstance(config, Path) or isinstance(config, str) and config.endswith(".toml"):
        given = read_config_file(config)
        settings, start, track = dict(given.settings), given.recipe, given.track
    for section, body in sections.items():
        if not isinstance(body, dict):
            raise UserError(f"stalwart.train({section}=...) takes a dict of keys, got {type(body).__name__}")
        settings.update({f"{section}.{k}": tuple(v) if isinstance(v, list) else v for k, v in body.items()})
    out = Path(out)
    try:
        cfg = run_config(start, settings, resume_from=out if resume else None, track=track)
    except ConfigError as e:
        raise given.locate(e, {f"{s}.{k}" for s, body in sections.items() for k in body}) if given else e from None
    check_out(out, resume=resume)
    return run_on_this_machine(cfg, out, resume=resume, quiet=quiet)


@dataclass
class Model:
    """A model ready to generate: its weights on `device`, its tokenizer and config."""

    module: DeepSeekForCausalLM
    tokenizer: Any
    device: Any

    @property
    def config(self):
        return self.module.cfg


def load(source: str | Path, *, device: str | None = None) -> Model:
    """A Hugging Face DeepSeek-V3-format folder (an export, or one transformers wrote), a
    run directory (its newest good checkpoint) or a preset name, on `device` (default:
    the best one here), in eval mode."""
    from stalwart.device import resolve_device
    from stalwart.model_source import open_model

    info = resolve_device(device)
    module, tokenizer = open_model(str(source))
    return Model(module.to(info.device).eval(), tokenizer, info.device)


def generate(model: Model, prompts: str | list[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, chat: bool = False) -> str | list[str]:
    """The continuation of each prompt (greedy at temperature 0; repeatable with `seed`),
    stopped at eos. `chat`: each prompt is a user message, rendered as the model was
    trained on conversations (data/chat.py)."""
    from stalwart.data.chat import prompt_text
    from stalwart.data.tokenizer import decode, encode
    from stalwart.sampling import generate as sample

    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = [encode(model.tokenizer, prompt_text(t) if chat else t) for t in texts]
    if not all(ids):
        raise UserError("a prompt is empty")
    new = sample(model.module, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    out = [decode(model.tokenizer, n) for n in new]
    return out[0] if isinstance(prompts, str) else out
