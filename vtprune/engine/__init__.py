"""The drop engine: the one place that changes sequence length.

A `PruneSession` attaches hooks to an unmodified vision-language model, found through its adapter
(`vtprune/models/`):

* a pre-hook on the model's forward. At prefill (a call with `pixel_values`) it runs the vision tower once,
  lets the method's vision stage select, and hands the LLM `inputs_embeds` holding only the kept image
  tokens (positions re-indexed contiguously, as LLaVA does when an image has fewer tokens). At decode it
  rewrites the 2-D mask and the position ids so they match the shorter cache;
* a pre-hook on every decoder layer from the first LLM-stage prune layer on. At a prune layer (prefill) it
  asks the method for a selection and gathers the hidden states, the rotary embeddings, the attention mask
  and the positions; every later layer gets that stage's mask and rotary embeddings (prefill and decode),
  so each layer's KV cache holds exactly the tokens that layer saw;
* a capture of the post-RoPE q/k of the layers whose attention a method scores (signals/attention.py);
* for a "vit" stage (iLLaVA, FlowCut), hooks inside the CLIP encoder that merge patches after the attention
  sub-block of the listed layers (vit.py); the tower's output then has fewer patches, and the original patch
  index of each survivor rides on the output object to the prefill.

Pruning happens once, at prefill; decode steps attend to the kept set. `generate()` works unchanged
(greedy, sampling, beams, batches with left padding), because the engine keeps, per stage, the prefix's
padding mask and positions and extends them with what `generate` appends.

The parts, each readable alone: session.py (the session and its hooks), vit.py (the vit stage), images.py
(image-token bookkeeping), selections.py and assemble.py (the vision stage's selection and the LLM input it
gives), drop.py (an LLM stage's drop as a pure function on tensors), masks.py, decode.py (decode steps),
state.py (what one generate() call remembers).
"""

from vtprune.engine.images import equal_shares, expanded_images
from vtprune.engine.masks import format_mask
from vtprune.engine.selections import stack_selections
from vtprune.engine.session import PruneSession

__all__ = ["PruneSession", "equal_shares", "expanded_images", "format_mask", "stack_selections"]
