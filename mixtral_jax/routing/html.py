"""A self-contained HTML page colouring each token of a text by its first-choice expert.

One block per layer (a selector switches layers); hovering a token shows all k choices and their
router probabilities. No external scripts, fonts or styles: the page opens offline.
"""

from __future__ import annotations

import colorsys
import html

import numpy as np

from mixtral_jax.routing.stats import RoutingTrace


def expert_colours(num_experts: int) -> list[str]:
    """Evenly spaced, light hues: dark text stays readable on every one."""
    colours = []
    for e in range(num_experts):
        r, g, b = colorsys.hls_to_rgb(e / num_experts, 0.78, 0.75)
        colours.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
    return colours


def render_token_page(trace: RoutingTrace, pieces: list[list[str]], title: str) -> str:
    """The page for `trace` over sequences whose token strings are `pieces` ([B][T])."""
    colours = expert_colours(trace.num_experts)
    legend = "".join(
        f'<span class="tok" style="background:{c}">expert {e}</span>' for e, c in enumerate(colours)
    )
    options = "".join(f'<option value="{i}">layer {i}</option>' for i in range(trace.num_layers))
    blocks = [_layer_block(trace, pieces, layer, colours) for layer in range(trace.num_layers)]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 70em; }}
.tok {{ padding: 1px 2px; margin: 0 1px; border-radius: 3px; white-space: pre-wrap; }}
.layer {{ display: none; line-height: 1.9; }} .layer.shown {{ display: block; }}
.seq {{ margin-bottom: 1em; }} .legend .tok {{ display: inline-block; margin: 2px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Each token is coloured by the expert its router ranked first; hover for all
{trace.topk} choices and their probabilities.</p>
<p class="legend">{legend}</p>
<label>Layer <select id="layer" onchange="show(this.value)">{options}</select></label>
{"".join(blocks)}
<script>
function show(i) {{
  document.querySelectorAll('.layer').forEach(function (b) {{ b.classList.remove('shown'); }});
  document.getElementById('layer-' + i).classList.add('shown');
}}
show(0);
</script>
</body></html>
"""


def _layer_block(trace: RoutingTrace, pieces, layer: int, colours: list[str]) -> str:
    rows = []
    for b, seq in enumerate(pieces):
        spans = []
        for t, piece in enumerate(seq):
            if not trace.mask[b, t]:
                continue
            chosen = trace.experts[layer, b, t]
            probs = trace.probs[layer, b, t]
            tip = ", ".join(f"e{int(e)}: {float(probs[e]):.2f}" for e in chosen)
            spans.append(
                f'<span class="tok" data-expert="{int(chosen[0])}" '
                f'style="background:{colours[int(chosen[0])]}" title="{tip}">'
                f"{html.escape(piece)}</span>"
            )
        rows.append(f'<div class="seq">{"".join(spans)}</div>')
    return f'<div class="layer" id="layer-{layer}">{"".join(rows)}</div>'


def first_choice_counts(page: str, num_experts: int) -> np.ndarray:
    """Counts of tokens per first-choice expert over all layers of a rendered page (for checks)."""
    return np.array([page.count(f'data-expert="{e}"') for e in range(num_experts)])
