"""FX graph analysis and rewriting: find attention sites, lift the pre-RoPE query, rewrite."""
