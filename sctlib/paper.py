"""The published numbers this project compares against, and the list of the SCT paper's claims.

Pure data plus two look-ups; no torch. The pipelines read their comparison rows from here
(:func:`matching_rows` picks the rows that fit a preset: same dataset, model size, conditioning and,
where the paper states it, the same number of training iterations), and the book's page *What the paper
says* renders both tables from here, so a number is typed once.

Sources, in order of reliability:

* ``ECT README`` - the README of the official ECT code (github.com/locuslab/ect, ``main`` branch), its
  CIFAR-10 table "ECM" by training iterations at batch 128 (Geng et al., arXiv 2406.14548, Table 1).
* ``SCT abstract`` - arXiv 2410.18958 v3, the abstract (read directly).
* ``SCT Table 2`` / ``SCT Table 3`` - the paper's CIFAR-10 and ImageNet-64 tables, known here only
  through a **third-party text extraction** of the paper's page 10 (the ``ai-paper-reviewer`` project's
  extraction of arXiv 2410.18958, ``tables/table_10_0.md``). Columns were partly misaligned there; the
  paper also prints a second value in parentheses whose meaning the extraction does not give (probably
  the best checkpoint or a guided figure), and ``*`` probably marks guidance. Every such row carries that
  caveat. Training iterations for the SCT rows are not stated in the extraction.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

__all__ = ["PaperRow", "Claim", "ROWS", "CLAIMS", "EXTRACTION_CAVEAT", "matching_rows", "comparison",
           "claim", "model_size"]

EXTRACTION_CAVEAT = ("third-party text extraction of the paper's Tables 2-3 (columns partly misaligned); "
                     "the paper body could not be checked here")


@dataclass(frozen=True)
class PaperRow:
    """One published FID (lower is better) with where it comes from."""

    method: str                 # 'ECT', 'SCT', 'SCT*' (guided), 'SCT phased', 'Cond-SCT', ...
    dataset: str                # 'cifar10' | 'imagenet64' (as in TrainConfig.dataset)
    model: str                  # 'DDPM++' (CIFAR-10) | 'EDM2-S' | 'EDM2-M' | 'EDM2-XL'
    cond: bool                  # class-conditional
    steps: int                  # sampling steps
    nfe: int                    # network evaluations per sample (= steps, no guidance counted here)
    fid: float
    source: str
    iterations: Optional[int] = None   # training iterations at batch 128; None = not stated
    guided: bool = False
    phased: bool = False
    fid_parenthesised: Optional[float] = None  # the second value the paper prints in parentheses
    caveat: str = ""

    @property
    def task(self) -> str:
        """'ect' or 'sct': which preset family the row compares with."""
        return "ect" if self.method.upper().startswith("ECT") else "sct"

    def label(self) -> str:
        it = f", {self.iterations // 1000}k it" if self.iterations else ""
        return f"{self.method} {self.model}{it}, {self.steps} step{'s' if self.steps > 1 else ''}"


def _ect_readme(iterations, steps, fid):
    return PaperRow("ECT", "cifar10", "DDPM++", False, steps, steps, fid, "ECT README (locuslab/ect), CIFAR-10 table",
                    iterations=iterations)


def _sct_t2(method, steps, fid, paren=None, *, cond=False, guided=False, phased=False, note=""):
    return PaperRow(method, "cifar10", "DDPM++", cond, steps, steps, fid, "SCT Table 2 (CIFAR-10)",
                    guided=guided, phased=phased, fid_parenthesised=paren,
                    caveat=EXTRACTION_CAVEAT + (f"; {note}" if note else ""))


def _sct_t3(method, model, steps, fid, paren=None, *, guided=False, note=""):
    return PaperRow(method, "imagenet64", model, True, steps, steps, fid, "SCT Table 3 (ImageNet-64)",
                    guided=guided, fid_parenthesised=paren, caveat=EXTRACTION_CAVEAT + (f"; {note}" if note else ""))


ROWS: Sequence[PaperRow] = (
    # CIFAR-10, ECT's own numbers by training length (ECT README; batch 128).
    _ect_readme(100_000, 1, 4.54), _ect_readme(200_000, 1, 3.86), _ect_readme(400_000, 1, 3.60),
    _ect_readme(100_000, 2, 2.20), _ect_readme(200_000, 2, 2.15), _ect_readme(400_000, 2, 2.11),
    # CIFAR-10, SCT's Table 2.
    _sct_t2("ECT", 1, 3.78, note="ECT as listed by SCT (iterations not stated)"),
    _sct_t2("ECT", 2, 2.13, note="ECT as listed by SCT (iterations not stated)"),
    _sct_t2("SCT", 1, 3.11, 2.98), _sct_t2("SCT", 2, 2.05, 2.05),
    _sct_t2("SCT*", 1, 2.92, 2.78, guided=True, note="* probably marks guidance"),
    _sct_t2("SCT*", 2, 2.02, 1.94, guided=True, note="* probably marks guidance"),
    _sct_t2("SCT phased", 4, 1.95, phased=True), _sct_t2("SCT phased", 8, 1.86, phased=True),
    _sct_t2("Cond-SCT", 1, 3.03, 2.94, cond=True), _sct_t2("Cond-SCT", 2, 1.88, 1.86, cond=True),
    _sct_t2("Cond-SCT*", 1, 2.88, 2.82, cond=True, guided=True, note="* probably marks guidance"),
    _sct_t2("Cond-SCT*", 2, 1.87, 1.84, cond=True, guided=True, note="* probably marks guidance"),
    # ImageNet-64, SCT's Table 3 (class-conditional EDM2 networks).
    _sct_t3("ECT", "EDM2-S", 1, 5.51), _sct_t3("ECT", "EDM2-S", 2, 3.18),
    _sct_t3("ECT", "EDM2-M", 1, 3.67), _sct_t3("ECT", "EDM2-M", 2, 2.35),
    _sct_t3("ECT", "EDM2-XL", 1, 3.35), _sct_t3("ECT", "EDM2-XL", 2, 1.96),
    _sct_t3("SCT", "EDM2-S", 1, 5.10, 4.59), _sct_t3("SCT", "EDM2-S", 2, 3.05, 2.98),
    _sct_t3("SCT", "EDM2-S", 4, 2.51, 2.43, note="row label of the 4-step column ambiguous"),
    _sct_t3("SCT", "EDM2-M", 1, 3.30, 3.06), _sct_t3("SCT", "EDM2-M", 2, 2.13, 2.09),
    _sct_t3("SCT", "EDM2-M", 4, 1.83, 1.78),
    _sct_t3("SCT*", "EDM2-M", 1, 2.42, 2.23, guided=True, note="* probably marks guidance; 2.42 is the abstract's"),
    # The abstract's headline (the best model; the abstract names no size; Table 3 puts it at SCT-M*).
    PaperRow("SCT*", "imagenet64", "EDM2-M", True, 2, 2, 1.55, "SCT abstract", guided=True,
             caveat="the abstract names no model size; Table 3 (extraction) cuts the 2-step SCT-M* cell off"),
)


@dataclass(frozen=True)
class Claim:
    """One claim of the paper (or one consequence of its method) and the experiment that checks it."""

    id: int
    claim: str
    where: str          # where in the paper (or which prior work) the claim is made
    experiment: str     # which of our experiments checks it (a chapter or a pipeline)
    chapter: str        # the book page holding that experiment (docname without folder)
    paper_number: str   # what the paper reports for it ("qualitative" where it gives no number)


CLAIMS: Sequence[Claim] = (
    Claim(1, "CT is SCT with one reference: with the own image as the only reference, SCT's target equals ECT's",
          "Fig. 1 (\"CT is a special case of SCT with only one reference sample\")",
          "exact equality of the two targets", "variance_reduction",
          "exact by construction (Fig. 1)"),
    Claim(2, "the reference weights are one-hot on the own image as t -> 0 and uniform as t -> infinity",
          "Sec. 4.1, from the score identity (STF: Xu et al. 2023)",
          "weights at small and large t on random data", "variance_reduction",
          "a limit, no number"),
    Claim(3, "the score-identity target has lower variance than the single-sample target at intermediate t",
          "abstract; Fig. 1 (\"High training variance\" for CT); Sec. 4.1",
          "error of the target vs t and number of references on a mixture with exact E[x0|x_t]",
          "variance_reduction",
          "qualitative (Fig. 1)"),
    Claim(4, "consistency training is TD value estimation: h(x_t,t) = R(t->r) + h(x_r,r) along the PF-ODE",
          "abstract; Sec. 3, Eq. 8 (as paraphrased by the reviewers)",
          "Bellman residual on exact PF-ODE trajectories of a Gaussian mixture", "mdp_td",
          "an identity, no number"),
    Claim(5, "SCT converges faster and ends better than ECT", "Fig. 3; Table 2",
          "the quickstart: ECT vs SCT tunings of the same teacher on sklearn digits", "results",
          "FID 3.11 vs 3.78 at 1 step, 2.05 vs 2.13 at 2 steps (CIFAR-10, Table 2)"),
    Claim(6, "a larger reference set (\"all\") gives a better target than the batch", "Fig. 4",
          "class-conditional references: samples with another image of their class vs references",
          "variance_reduction",
          "Fig. 4: \"all\" best (values not recovered)"),
    Claim(7, "a smoother schedule avoids the discretisation jumps of ECT's staircase", "Sec. 4.2 (reviewers' summary)",
          "toy tunings: staircase vs smooth schedule, loss at the stage boundaries", "recipe",
          "qualitative"),
    Claim(8, "edge-skipping multistep sampling helps phased models", "Fig. 5",
          "exact-toy phased sampler over the edge-skipping strength eta", "multistep",
          "Fig. 5 (values not recovered)"),
    Claim(9, "guiding the model by an earlier EMA of itself lowers FID at some w > 1", "Fig. 6",
          "toy SCT model guided by its 25/50/75 % EMA snapshots over w", "multistep",
          "Fig. 6: U-shaped FID vs w (values not recovered)"),
    Claim(10, "the stable target is cheap next to a network evaluation",
          "not quantified in the paper (our question)", "posterior mean vs one DDPM++ forward; GPU step cost",
          "variance_reduction",
          "not reported"),
    Claim(11, "SCT lowers the variance of the training target, per t", "abstract (the paper's thesis)",
          "per-t residual ||target - f(x_t,t)||^2 during toy tunings, ECT vs SCT", "recipe",
          "qualitative"),
    Claim(12, "ImageNet-64: 1-step FID 2.42 and 2-step FID 1.55, the best consistency models",
          "abstract; Table 3", "pipelines/train_imagenet64.ipynb (GPU)", "results",
          "2.42 / 1.55 (guided SCT-M per Table 3)"),
    Claim(13, "CIFAR-10: SCT beats ECT at 1 and 2 steps (3.11 / 2.05 vs 3.78 / 2.13)", "Table 2",
          "pipelines/train_cifar10.ipynb (GPU)", "results",
          "3.11 / 2.05 vs ECT 3.78 / 2.13"),
)


def claim(claim_id: int) -> Claim:
    """The claim with this id (KeyError naming the valid ids otherwise)."""
    for c in CLAIMS:
        if c.id == claim_id:
            return c
    raise KeyError(f"no claim {claim_id}; the claims are numbered {CLAIMS[0].id}..{CLAIMS[-1].id}")


_EDM2_SIZES = {192: "EDM2-S", 256: "EDM2-M", 320: "EDM2-L", 384: "EDM2-XL"}


def model_size(cfg) -> str:
    """The paper's name for a config's network ('DDPM++', 'EDM2-S', ...); '' if it has none."""
    if cfg.net.arch == "ddpmpp" and cfg.net.img_resolution == 32 and cfg.net.model_channels == 128:
        return "DDPM++"
    if cfg.net.arch == "edm2" and cfg.net.img_resolution == 64:
        return _EDM2_SIZES.get(cfg.net.model_channels, "")
    return ""


def matching_rows(cfg, *, steps: Sequence[int] = (1, 2), guided: bool = False, phased: bool = False) -> List[PaperRow]:
    """The published rows a run of ``cfg`` can be compared with, like for like.

    A row matches when its dataset, model size, conditioning and method family (ECT / SCT, from
    ``cfg.loss.task``) are the run's, its step count is in ``steps``, it is guided/phased only when asked
    for, and - where the paper states the training length - its iteration count equals the run's
    (``total_nimg / batch_size``). Rows that do not state a length are returned with that caveat; an
    empty list means the paper has no like-for-like number (e.g. an EDM2-L preset).
    """
    size = model_size(cfg)
    iterations = cfg.total_nimg // max(cfg.batch_size, 1)
    out = []
    for row in ROWS:
        if (row.dataset != cfg.dataset or row.model != size or row.cond != bool(cfg.cond)
                or row.task != cfg.loss.task or row.steps not in steps or row.guided != guided
                or row.phased != phased):
            continue
        if row.iterations is not None and row.iterations != iterations:
            continue
        out.append(row)
    return out


def comparison(cfg, **kw) -> List[dict]:
    """:func:`matching_rows` as JSON-ready dicts (what a pipeline stores under ``paper`` in results.json)."""
    return [dict(asdict(r), label=r.label()) for r in matching_rows(cfg, **kw)]
