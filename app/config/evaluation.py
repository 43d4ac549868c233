"""The eval file of `registry compare A B --eval FILE`: which prompts, how long to generate, which metrics.

```yaml
data: eval-pairs.jsonl     # prompt/completion or messages rows
max_new_tokens: 16
metrics: [exact_match, token_f1, perplexity]
normalize: true
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator

from app.config.base import ConfigError, Section, format_validation_error, read_config_tree

LMMetric = Literal["exact_match", "token_f1", "perplexity"]


class EvalConfig(Section):
    """How two causal-LM versions are evaluated side by side on the same prompts."""

    data: str
    """JSONL file of prompt/reference pairs (relative paths: from the current directory): `{"prompt", "completion"}` rows, or `{"messages": [...]}` rows whose last turn is the assistant's reference answer (the turns before it are rendered with the model's chat template, or the plain template without one)."""
    max_new_tokens: int = Field(32, ge=1, le=4096)
    """Greedy generation stops after this many new tokens, or earlier at the model's end-of-sequence token (exact_match, token_f1)."""
    metrics: list[LMMetric] = Field(default_factory=lambda: ["exact_match", "token_f1", "perplexity"], min_length=1)
    """Which metrics: `exact_match` and `token_f1` of the greedy generation against the reference, `perplexity` of the reference given the prompt (exp of the token-weighted mean negative log-likelihood of the reference's tokens)."""
    normalize: bool = True
    """Compare answers after SQuAD's normalisation (lowercase, punctuation and the articles a / an / the removed, whitespace collapsed); false: as written, only split on whitespace."""
    batch_size: int = Field(16, ge=1)
    """Prompts generated (and references scored) together in one batch."""

    @field_validator("metrics")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        repeated = sorted({m for m in value if value.count(m) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} named more than once")
        return value


def load_eval_config(path: str | Path) -> EvalConfig:
    """The eval file at `path`, validated; ConfigError with one line per problem, each naming its key."""
    tree = read_config_tree(path)
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: an eval file must be a mapping (data, max_new_tokens, metrics, ...)")
    try:
        cfg = EvalConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"invalid eval file {path}:\n" + format_validation_error(err)) from None
    if not Path(cfg.data).is_file():
        raise ConfigError(f"{path}: data: no such file {cfg.data!r}")
    return cfg
