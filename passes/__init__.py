"""FX graph analysis and rewriting: find attention sites, lift the pre-RoPE query, rewrite.

Modules, in the order a graph flows through them:

- ``sites``: find every aten SDPA call and normalise it (``AttentionSite``)
- ``rope``: walk the query back through its RoPE to the pre-RoPE query (``RopeMatch``)
- ``masks``: prove an attention mask selects keys (bool, or ``where(bool, 0, -inf)``)
- ``module_checks``: sliding window, softcap, cross-attention, non-causal modules
- ``methods``: the method registry, config type -> ``MethodRewrites`` (``method_rewrites``)
- ``decode_rewrite`` / ``prefill_rewrite``: check a site (``site_checks``), build its inputs
  and call its method's rewrite (``<method>_rewrite``: ``exact``, ``mac``, ``topk_phi``,
  ``mac_topk_phi``); ``key_range`` and ``mask_holes`` serve the key-range methods
- ``graph_insert``: ``call`` and ``size_arg``, how every rewrite inserts nodes
- ``manager``: the Inductor ``CustomGraphPass`` running all of it, with its uuid
- ``scope``: which modules ``macopt.optimize`` put in scope, and the per-site reports
- ``_compat``: every private torch import
"""

if __name__ == "passes":  # the repository root is on sys.path: see _unshadow.py
    from macopt.kernels._unshadow import hand_over as _hand_over

    _hand_over(__name__, __file__)
