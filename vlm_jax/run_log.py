"""What a training run writes for people: `metrics.jsonl` (one JSON object per logged step) and a PNG plot."""
import json
import math

from etils import epath

from vlm_jax import fileutil


class MetricsLog:
  """Appends to workdir/metrics.jsonl; a resumed run drops records past its restored step first. The workdir
  may be remote (gs://...): object stores cannot append, so there each write rewrites the (small) file."""

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.enabled = enabled
    self._local = not fileutil.is_remote(workdir)
    self._last = None  # the last record written: its step and keys
    if enabled and self.path.exists():
      kept = [json.dumps(r) + "\n" for r in self._read(drop_torn_end=True) if r.get("step", 0) <= resume_step]
      fileutil.write_file(self.path, "".join(kept))  # a crash here must not lose the kept records
      self._last = json.loads(kept[-1]) if kept else None

  def write(self, record: dict):
    """Appends `record`; one with the same step and keys as the last record replaces it (the same evaluation run
    again: a finished run started once more re-evaluates its last step)."""
    if not self.enabled:
      return
    line = json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                       for k, v in record.items()}) + "\n"
    last, self._last = self._last, record
    if last is not None and last.get("step") == record.get("step") and set(last) == set(record):
      fileutil.write_file(self.path, "".join(self.path.read_text().splitlines(keepends=True)[:-1]) + line)
    elif self._local:
      with self.path.open("a") as f:
        f.write(line)
    else:
      fileutil.write_file(self.path, (self.path.read_text() if self.path.exists() else "") + line)

  def records(self) -> list[dict]:
    return self._read() if self.path.exists() else []

  def _read(self, drop_torn_end: bool = False) -> list[dict]:
    """The file's records. A run killed while appending can leave its last line cut short: a resumed run drops
    it (`drop_torn_end`); any other line that is not JSON is an error naming it."""
    lines = self.path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
      if not line.strip():
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError as e:
        if drop_torn_end and i == len(lines) - 1:
          break
        raise ValueError(f"{self.path}:{i + 1}: not a JSON record ({e}).") from e
    return out


def plot(records: list[dict], out_png):
  """Training loss (and any held-out metrics) against step, stages shaded, written as PNG to `out_png` (a path
  or a binary file)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  train = [r for r in records if r.get("loss") is not None]
  evals = sorted({k for r in records for k in r if k.startswith("eval/")})
  fig, axes = plt.subplots(1, 1 + bool(evals), figsize=(6 * (1 + bool(evals)), 4), squeeze=False)
  ax = axes[0][0]
  ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
  ax.set_xlabel("step"), ax.set_ylabel("train loss"), ax.set_yscale("log"), ax.grid(alpha=0.3)
  stage_starts = {}
  for r in train:
    stage_starts.setdefault(r.get("stage", 0), r["step"])
  for stage, step in stage_starts.items():
    ax.axvline(step, color="grey", ls=":", lw=1)
    ax.text(step, ax.get_ylim()[1], f" stage {stage}", va="top", fontsize=8)
  if evals:
    ax = axes[0][1]
    for k in evals:
      pts = [(r["step"], r[k]) for r in records if r.get(k) is not None]
      ax.plot(*zip(*pts), marker="o", label=k[5:])
    ax.set_xlabel("step"), ax.set_ylabel("held-out metric"), ax.legend(), ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out_png, dpi=100)
  plt.close(fig)
