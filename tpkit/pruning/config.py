"""Pruning configuration: typed dataclasses, loadable from YAML by :mod:`tpkit.config`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

STAGE1_SCORES = (
    "cosine",
    "cosine_centered",
    "cls_attn",
    "cosine_mean",
    "mean_distance",
    "attn_received",
    "random",
)
CLS_SCORES = ("cosine", "cosine_centered", "cls_attn")  # need a tower with a CLS token
STAGE1_GROUPS = ("image", "view")
STAGE1_SELECTORS = ("kneedle", "curvature", "iqr", "ratio", "budget")
STAGE1_POSITIONS = ("contiguous", "original")
STAGE2_QUERIES = ("instruction", "last")
STAGE2_REDUCES = ("mean", "max")
STAGE2_SELECTORS = ("kneedle", "curvature", "ratio", "budget")


@dataclass
class Stage1Config:
    """Dynamic visual pruning before the LLM (CLS similarity + inflection cut)."""

    enabled: bool = True
    # cosine: cos(CLS, patch) at vision_feature_layer; cosine_centered: both minus the mean patch;
    # cls_attn: CLS row of the tower's last-layer attention (PruMerge/FasterVLM). Towers without CLS
    # (SigLIP, Qwen's ViT): mean_distance: 1 - cos(mean patch, patch), the patches least like the
    # image's mean first; cosine_mean: cos(mean patch, patch); attn_received: mean attention each patch
    # receives in the tower's last layer. random: seeded baseline. null: the family's default (cosine
    # with a CLS token, else mean_distance)
    score: (
        Literal[
            "cosine", "cosine_centered", "cls_attn", "cosine_mean", "mean_distance", "attn_received", "random"
        ]
        | None
    ) = None
    # kneedle/curvature: inflection of the sorted curve; iqr: PruMerge outliers; ratio/budget: fixed
    selector: Literal["kneedle", "curvature", "iqr", "ratio", "budget"] = "kneedle"
    ratio: float = 0.25  # selector "ratio": fraction of patches kept
    budget: int = 64  # selector "budget": patches kept
    min_keep: int = 4  # clamps applied after every selector
    max_keep: int | None = None  # None = all patches
    seed: int = 0  # score "random"
    # images of several views (LLaVA-NeXT/OneVision: a base view + high-resolution crops; InternVL: tiles
    # + a thumbnail): one knee per image over all its views (image), or one per view (view: each view)
    groups: Literal["image", "view"] = "image"
    # Position ids of the shortened LLM input. original: every kept token keeps the position it has in
    # the unpruned prompt, so the LLM sees the patches' raster geometry and the text where the unpruned
    # model saw it - the pruned forward is the unpruned one with the dropped tokens masked out, as for
    # stage 2; contiguous: renumbered 0..T1-1, as if the dropped patches had never been there (what
    # pre-LLM pruning often does). On the tiny LLaVA early in training, training-free, original kept
    # 101.7% of dense accuracy where contiguous kept 81.0% (docs/method.md).
    positions: Literal["contiguous", "original"] = "original"
    # Qwen-family towers only (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5): score and drop merged units
    # after this vision-tower block (0-based; on Qwen2.5-VL a full-attention block, e.g. 7 of its 32)
    # and run the later blocks, DeepStack mergers and the merger on the kept units only, so that
    # pruning saves tower time too; null: score after the whole tower
    in_tower_block: int | None = None
    # Which patches fill the knee's k1 slots (the knee still decides how many): 0 = the k1 best scores
    # (the paper's rule); w > 0: taken greedily by score (scaled so the best is 1) minus w x how much a
    # patch repeats one already taken, so that the slots spread over the image instead of piling onto
    # the few patches most like the summary
    diversity: float = 0.0
    # with diversity, what "repeats" means: features (a patch's largest cosine, of the tower features, to
    # a patch taken) or grid (how many taken patches lie within diversity_radius cells: spatial coverage,
    # the best-scored of the patches with the fewest taken neighbours goes next)
    diversity_by: Literal["features", "grid"] = "features"
    diversity_radius: int | None = None  # only patches within this many grid cells repeat (None: any)
    # Context tokens (VisionZip-like), carved out of the k1 slots: the dropped patches are clustered
    # around this many seeds spread over them and each seed's slot carries its cluster's mean, so the
    # LLM still sees a summary of what was dropped (the background); 0 = none. k1 is unchanged, and
    # an image that keeps every patch is unchanged too
    context_tokens: int = 0

    def validate(self) -> None:
        if self.context_tokens < 0:
            raise ValueError(f"context_tokens = {self.context_tokens} must be >= 0")
        if self.diversity < 0:
            raise ValueError(f"diversity = {self.diversity} must be >= 0")
        if self.diversity_by not in ("features", "grid"):
            raise ValueError(f"diversity_by = {self.diversity_by!r} must be 'features' or 'grid'")
        if self.diversity_radius is not None and self.diversity_radius < 0:
            raise ValueError(f"diversity_radius = {self.diversity_radius} must be >= 0 (or null)")
        if self.diversity > 0 and self.diversity_by == "grid" and self.diversity_radius is None:
            raise ValueError("diversity_by = 'grid' needs diversity_radius (grid cells), e.g. 1")
        if self.in_tower_block is not None and self.in_tower_block < 0:
            raise ValueError(f"in_tower_block = {self.in_tower_block} must be >= 0 (or null)")
        if self.positions not in STAGE1_POSITIONS:
            raise ValueError(f"positions = {self.positions!r} must be one of {list(STAGE1_POSITIONS)}")
        if self.groups not in STAGE1_GROUPS:
            raise ValueError(f"groups = {self.groups!r} must be one of {list(STAGE1_GROUPS)}")
        if self.score is not None and self.score not in STAGE1_SCORES:
            raise ValueError(f"score = {self.score!r} must be one of {list(STAGE1_SCORES)}")
        if self.selector not in STAGE1_SELECTORS:
            raise ValueError(f"selector = {self.selector!r} must be one of {list(STAGE1_SELECTORS)}")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio = {self.ratio} must be in (0, 1]")
        if self.budget < 1:
            raise ValueError(f"budget = {self.budget} must be >= 1")
        if self.min_keep < 1:
            raise ValueError(f"min_keep = {self.min_keep} must be >= 1")
        if self.max_keep is not None and self.max_keep < self.min_keep:
            raise ValueError(f"min_keep = {self.min_keep} > max_keep = {self.max_keep}")


@dataclass
class Stage2Config:
    """Cross-modal pruning inside the LLM at decoder layer ``layer``."""

    enabled: bool = True
    layer: int = 2  # layers >= layer run on the kept tokens; scored with this layer's own q/k
    # instruction: text tokens after the image (not answers) are the queries; last: FastV (last token)
    query: Literal["instruction", "last"] = "instruction"
    # how the queries' attention rows (head-averaged) become one score per token: mean (each query
    # weighs the same), max (a token counts as much as the query that attends to it most, so that an
    # instruction naming two objects keeps both)
    reduce: Literal["mean", "max"] = "mean"
    selector: Literal["kneedle", "curvature", "ratio", "budget"] = "kneedle"
    ratio: float = 0.5  # selector "ratio": fraction of the droppable tokens kept
    budget: int | None = None  # selector "budget": droppable tokens kept
    prune_text: bool = True  # text before the image (system prompt) is droppable too
    prune_visual: bool = True  # stage 1's visual tokens are droppable (false: stage 2 prunes text only)
    min_keep: int = 1  # droppable tokens kept at least
    max_keep: int | None = None  # droppable tokens kept at most (None = no cap): bounds k2 whatever the knee
    # Redundancy-aware choice of the kept patches (the knee and the score order still decide how many
    # tokens, and how many of them patches): the patches are taken greedily by score minus diversity
    # x their largest cosine (the layer's normed hidden states) to a patch already taken. 0 = by
    # score alone (the paper's rule).
    diversity: float = 0.0
    # with diversity: only patches within this many grid cells of each other are redundant (None: any)
    diversity_radius: int | None = None

    def validate(self) -> None:
        if self.diversity < 0:
            raise ValueError(f"diversity = {self.diversity} must be >= 0")
        if self.diversity_radius is not None and self.diversity_radius < 0:
            raise ValueError(f"diversity_radius = {self.diversity_radius} must be >= 0 (or null)")
        if self.query not in STAGE2_QUERIES:
            raise ValueError(f"query = {self.query!r} must be one of {list(STAGE2_QUERIES)}")
        if self.reduce not in STAGE2_REDUCES:
            raise ValueError(f"reduce = {self.reduce!r} must be one of {list(STAGE2_REDUCES)}")
        if self.selector not in STAGE2_SELECTORS:
            raise ValueError(f"selector = {self.selector!r} must be one of {list(STAGE2_SELECTORS)}")
        if self.layer < 0:
            raise ValueError(f"layer = {self.layer} must be >= 0")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio = {self.ratio} must be in (0, 1]")
        if self.selector == "budget" and self.budget is None:
            raise ValueError("selector 'budget' needs budget (droppable tokens kept)")
        if self.budget is not None and self.budget < 0:
            raise ValueError(f"budget = {self.budget} must be >= 0")
        if self.min_keep < 0:
            raise ValueError(f"min_keep = {self.min_keep} must be >= 0")
        if self.enabled and not (self.prune_visual or self.prune_text):
            raise ValueError(
                "prune_visual and prune_text are both false: nothing to prune (set enabled: false)"
            )
        if self.max_keep is not None and self.max_keep < self.min_keep:
            raise ValueError(f"min_keep = {self.min_keep} > max_keep = {self.max_keep}")


@dataclass
class PruningConfig:
    """Both stages. ``PruningConfig.disabled()`` = stock behaviour."""

    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    # Round the pruned sequence lengths (after stage 1 and after stage 2) up to a multiple of this, the
    # extra slots masked like padding (results do not change): a compiled or graph-captured model then
    # sees a few shapes only. 0 = exact lengths.
    bucket: int = 0

    @classmethod
    def disabled(cls) -> PruningConfig:
        return cls(stage1=Stage1Config(enabled=False), stage2=Stage2Config(enabled=False))

    @property
    def enabled(self) -> bool:
        return self.stage1.enabled or self.stage2.enabled

    def check_patches(self, n_patches: int) -> None:
        """ValueError (naming the key) when stage 1 cannot prune an image of ``n_patches`` patches."""
        s1 = self.stage1
        if not s1.enabled:
            return
        if s1.min_keep >= n_patches:
            raise ValueError(
                f"pruning.stage1.min_keep = {s1.min_keep} but an image of this model has {n_patches} patches: "
                f"stage 1 would keep every patch. Set it below {n_patches}"
            )
        if s1.selector == "budget" and s1.budget >= n_patches:
            raise ValueError(
                f"pruning.stage1.budget = {s1.budget} but an image of this model has {n_patches} patches: "
                f"stage 1 would keep every patch. Set it below {n_patches}"
            )

    def validate(self) -> None:
        if self.bucket < 0:
            raise ValueError(f"bucket = {self.bucket} must be >= 0 (0 = exact lengths)")
        for name in ("stage1", "stage2"):
            try:
                getattr(self, name).validate()
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
