"""Less compute per step: one patch mechanism (which block, what to reuse, on which steps) for UNets and DiTs.

- `BlockReuse`: feature inheritance (A-SDM, Hou et al. 2024, block / layer / unit granularity) -- on off-steps
  a module returns the output it produced at the last full step. DeepCache (Ma et al. 2024) is the special case
  that reuses everything below a shallow branch (`deepcache_paths`).
- `FirstBlockCache`: DiTs; run the first block, and skip the rest while the accumulated relative change of its
  residual stays under a threshold (ParaAttention's First Block Cache, TeaCache's accumulated-change rule).
- `search`: per-step DiT cache schedules searched offline (residual-change profile on calibration prompts, dynamic
  programming over which steps compute), saved as JSON that `FirstBlockCache(schedule=...)` follows in both surfaces.
- `Rettention`: Re-ttention (Chen et al. 2025) sparse attention for DiTs; sparse steps attend to the top keys per
  query block and restore the dropped softmax mass from statistics recorded at the last dense step.
- `LocalAttention`: CLEAR (Liu et al. 2024) local-window attention for DiTs; each image token attends to the image
  tokens within a radius and to all text tokens (`local_attention.py`; the attention LoRA that makes a DiT work with
  it is distilled by tiny/clear.py).
- `block_search`: AutoDiffusion's architecture half -- a per-step, per-block plan (`BlockPlan`: which blocks compute
  at each step; a skipped block adds its residual from the last step it computed), applied by `BlockPlanCache` and
  searched offline by evolution under a budget of block evaluations, jointly with the sigmas if asked.
- `prune`: LAPTOP-Diff's one-shot layer-removal score, its additivity check and a config a loader applies.

Surfaces (diffusers hooks in pipelines/caching.py, ComfyUI wrappers in nodes/caching.py) only translate the
timestep and call these objects; the per-step state lives in `StepClock` and the caches here.
"""

from .block_search import BlockPlanCache
from .first_block import FirstBlockCache
from .layouts import deepcache_paths, detect_layout, dit_block_paths
from .local_attention import LocalAttention
from .patch import ModelPatch, count_calls
from .reuse import BlockReuse
from .schedule import BlockPlan, CacheSchedule
from .sparse_attention import Rettention
from .state import StepClock

__all__ = ["BlockPlan", "BlockPlanCache", "BlockReuse", "CacheSchedule", "FirstBlockCache", "LocalAttention", "ModelPatch",
           "Rettention", "StepClock", "count_calls",
           "deepcache_paths", "detect_layout", "dit_block_paths"]
