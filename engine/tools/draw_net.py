"""Draw a net as an SVG picture (or Graphviz .dot text) without Graphviz, like Caffe's
python/draw_net.py: `python -m engine.tools.draw_net NET.prototxt OUT.svg [--rankdir LR]`.

Layers are boxes coloured by type, blobs are ellipses, edges are arrows; the layout is a
layered DAG drawing (longest-path ranks, dummy nodes on long edges, barycentre ordering).
"""

import argparse
import collections
import os
import sys
from xml.sax.saxutils import escape

from engine import io
from engine.proto import caffe_pb2
from engine.upgrade import upgrade_net_param

# Fill colours by layer family (Caffe's draw_net uses the first three).
COLOURS = {
    "#FF5050": ("Convolution", "Deconvolution", "Im2col"),
    "#FF9900": ("Pooling", "SPP"),
    "#CC33FF": ("InnerProduct", "Embed"),
    "#7FC97F": ("Data", "Input", "HDF5Data", "ImageData", "MemoryData", "WindowData", "DummyData"),
    "#B3E2B3": (
        "ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "BNLL", "Power", "Exp", "Log",
        "Threshold", "Swish", "Clip", "Dropout",
    ),
    "#FFD966": ("LRN", "BatchNorm", "Scale", "Bias", "MVN"),
    "#00CED1": ("LSTM", "RNN", "LSTMUnit"),
    "#B0C4DE": (
        "Concat", "Slice", "Split", "Eltwise", "Flatten", "Reshape", "Crop", "Tile", "Silence",
        "BatchReindex", "Filter", "Parameter", "Reduction", "ArgMax",
    ),
    "#FF88AA": ("Accuracy",),
}  # fmt: skip
TYPE_COLOUR = {t: c for c, types in COLOURS.items() for t in types}
LOSS_COLOUR = "#FF88AA"
DEFAULT_COLOUR = "#6495ED"
BLOB_COLOUR = "#E8E8E8"

CHAR_W, LINE_H, PAD = 7.0, 15.0, 8.0  # text metrics of the 12 px font (approximate)
RANK_GAP, NODE_GAP = 36.0, 18.0

Node = collections.namedtuple("Node", "id kind label colour")  # kind: layer, blob, dummy


def layer_colour(type_name):
    if type_name.endswith("Loss"):
        return LOSS_COLOUR
    return TYPE_COLOUR.get(type_name, DEFAULT_COLOUR)


def _first(values, default):
    return values[0] if len(values) else default


def layer_details(lp):
    """One short line of the layer's main settings (empty when nothing is worth showing)."""
    t = lp.type
    if t in ("Convolution", "Deconvolution"):
        p = lp.convolution_param
        k = p.kernel_h if p.HasField("kernel_h") else _first(p.kernel_size, 1)
        s = p.stride_h if p.HasField("stride_h") else _first(p.stride, 1)
        pad = p.pad_h if p.HasField("pad_h") else _first(p.pad, 0)
        group = f" g{p.group}" if p.group != 1 else ""
        return f"{p.num_output} k{k} s{s} p{pad}{group}"
    if t == "Pooling":
        p = lp.pooling_param
        method = caffe_pb2.PoolingParameter.PoolMethod.Name(p.pool)
        if p.global_pooling:
            return f"{method} global"
        k = p.kernel_h if p.HasField("kernel_h") else p.kernel_size
        s = p.stride_h if p.HasField("stride_h") else p.stride
        return f"{method} k{k} s{s} p{p.pad}"
    if t == "InnerProduct":
        return f"out {lp.inner_product_param.num_output}"
    if t == "Embed":
        return f"{lp.embed_param.input_dim} -> {lp.embed_param.num_output}"
    if t in ("LSTM", "RNN"):
        return f"out {lp.recurrent_param.num_output}"
    if t == "LRN":
        return f"size {lp.lrn_param.local_size}"
    if t == "Dropout":
        return f"ratio {lp.dropout_param.dropout_ratio:g}"
    if t == "Eltwise":
        return caffe_pb2.EltwiseParameter.EltwiseOp.Name(lp.eltwise_param.operation)
    if t == "Data":
        return f"batch {lp.data_param.batch_size}"
    if t == "Input":
        return ", ".join("x".join(str(d) for d in s.dim) for s in lp.input_param.shape)
    return ""


# --- graph -------------------------------------------------------------------------------------


def net_graph(param):
    """(nodes, edges) of a NetParameter: one node per layer, one per blob version (a layer
    writing in place makes a new version, so the graph stays acyclic), in topological order."""
    nodes, edges = [], []
    current = {}  # blob name -> node index of its latest version

    def blob_node(name):
        nodes.append(Node(f"blob{len(nodes)}", "blob", [name], BLOB_COLOUR))
        return len(nodes) - 1

    for i, lp in enumerate(param.layer):
        bottoms = []
        for name in lp.bottom:
            if name not in current:  # an input nobody produces (e.g. a filtered-out layer)
                current[name] = blob_node(name)
            bottoms.append(current[name])
        label = [lp.name, f"({lp.type})"]
        details = layer_details(lp)
        if details:
            label.append(details)
        if any(lp.loss_weight):
            label.append("loss weight " + ", ".join(f"{w:g}" for w in lp.loss_weight))
        nodes.append(Node(f"layer{i}", "layer", label, layer_colour(lp.type)))
        me = len(nodes) - 1
        edges.extend((b, me) for b in bottoms)
        for name in lp.top:
            if name in lp.bottom or name not in current:
                current[name] = blob_node(name)
            # A layer re-producing a name not in place (TRAIN and TEST data layers drawn
            # together) writes the same blob node.
            edges.append((me, current[name]))
    return nodes, edges


def _ranks(n, edges):
    rank = [0] * n
    for a, b in sorted(edges, key=lambda e: e[1]):  # node order is topological
        rank[b] = max(rank[b], rank[a] + 1)
    return rank


def _node_size(node, rankdir):
    """(size along the rank order axis, size along the rank axis), i.e. (w, h) for TB."""
    if node.kind == "dummy":
        w, h = 2.0, 2.0
    else:
        w = max(len(s) for s in node.label) * CHAR_W + 2 * PAD
        h = len(node.label) * LINE_H + PAD
        if node.kind == "blob":
            w, h = w + 16, h + 6
    return (w, h) if rankdir == "TB" else (h, w)


def layout(nodes, edges, rankdir="TB"):
    """Positions of every node (centre x, y) and the polyline of every edge."""
    rank = _ranks(len(nodes), edges)
    nodes = list(nodes)
    # Split long edges with dummy nodes so every edge joins adjacent ranks.
    chains = []
    short = []
    for a, b in edges:
        chain = [a]
        for r in range(rank[a] + 1, rank[b]):
            nodes.append(Node(f"dummy{len(nodes)}", "dummy", [""], ""))
            rank.append(r)
            chain.append(len(nodes) - 1)
        chain.append(b)
        chains.append(chain)
        short.extend(zip(chain, chain[1:]))
    n_ranks = max(rank, default=0) + 1
    layers = [[] for _ in range(n_ranks)]
    for v in range(len(nodes)):
        layers[rank[v]].append(v)
    preds, succs = collections.defaultdict(list), collections.defaultdict(list)
    for a, b in short:
        preds[b].append(a)
        succs[a].append(b)
    # Order within ranks: barycentre sweeps.
    pos = {v: i for layer in layers for i, v in enumerate(layer)}
    for _ in range(6):
        for order, nbrs in ((range(1, n_ranks), preds), (range(n_ranks - 2, -1, -1), succs)):
            for r in order:
                key = {}
                for v in layers[r]:
                    ns = nbrs[v]
                    key[v] = sum(pos[u] for u in ns) / len(ns) if ns else pos[v]
                layers[r].sort(key=lambda v: (key[v], pos[v]))
                for i, v in enumerate(layers[r]):
                    pos[v] = i
    sizes = [_node_size(nd, rankdir) for nd in nodes]
    # Coordinates along the order axis: pull each node towards its neighbours' mean, keeping
    # the order and the gaps (a sweep each way, averaged).
    coord = {}
    for layer in layers:
        x = 0.0
        for v in layer:
            coord[v] = x + sizes[v][0] / 2
            x += sizes[v][0] + NODE_GAP
        shift = x / 2
        for v in layer:
            coord[v] -= shift

    def place(layer, want):
        def sweep(seq, sign):
            out, last = {}, None
            for v in seq:
                c = want[v]
                if last is not None:
                    gap = (sizes[last][0] + sizes[v][0]) / 2 + NODE_GAP
                    c = max(c, out[last] + gap) if sign > 0 else min(c, out[last] - gap)
                out[v], last = c, v
            return out

        fwd, bwd = sweep(layer, 1), sweep(layer[::-1], -1)
        for v in layer:
            coord[v] = (fwd[v] + bwd[v]) / 2
        # Averaging can break the spacing: one final left-to-right repair.
        for u, v in zip(layer, layer[1:]):
            gap = (sizes[u][0] + sizes[v][0]) / 2 + NODE_GAP
            coord[v] = max(coord[v], coord[u] + gap)

    for _ in range(4):
        for order, nbrs in ((range(1, n_ranks), preds), (range(n_ranks - 2, -1, -1), succs)):
            for r in order:
                want = {}
                for v in layers[r]:
                    ns = nbrs[v]
                    want[v] = sum(coord[u] for u in ns) / len(ns) if ns else coord[v]
                place(layers[r], want)
    # Coordinates along the rank axis.
    depth, level = [], 0.0
    for layer in layers:
        extent = max((sizes[v][1] for v in layer), default=0.0)
        depth.append(level + extent / 2)
        level += extent + RANK_GAP
    lo = min((coord[v] - sizes[v][0] / 2 for v in coord), default=0.0)
    margin = 10.0
    xy, wh = {}, {}
    for v in range(len(nodes)):
        a, b = coord[v] - lo + margin, depth[rank[v]] + margin
        xy[v] = (a, b) if rankdir == "TB" else (b, a)
        wh[v] = sizes[v] if rankdir == "TB" else (sizes[v][1], sizes[v][0])
    width = max((xy[v][0] + wh[v][0] / 2 for v in xy), default=0.0) + margin
    height = max((xy[v][1] + wh[v][1] / 2 for v in xy), default=0.0) + margin
    return nodes, xy, wh, chains, (width, height)


# --- output ------------------------------------------------------------------------------------


def _edge_points(chain, xy, wh, rankdir):
    pts = [xy[v] for v in chain]
    (ax, ay), (bx, by) = pts[0], pts[-1]
    a, b = chain[0], chain[-1]
    if rankdir == "TB":
        pts[0] = (ax, ay + wh[a][1] / 2)
        pts[-1] = (bx, by - wh[b][1] / 2)
    else:
        pts[0] = (ax + wh[a][0] / 2, ay)
        pts[-1] = (bx - wh[b][0] / 2, by)
    return pts


def to_svg(param, rankdir="TB"):
    """The SVG document (a string) of a NetParameter."""
    graph = net_graph(param)
    nodes, xy, wh, chains, (width, height) = layout(*graph, rankdir=rankdir)
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.1f} {height:.1f}" font-family="Helvetica, Arial, sans-serif" '
        'font-size="12">',
        f"<title>{escape(param.name or 'net')}</title>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" '
        'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
        '<path d="M0,0 L10,5 L0,10 z" fill="#444"/></marker></defs>',
        '<g class="edges" fill="none" stroke="#444" stroke-width="1.2">',
    ]
    for chain in chains:
        pts = _edge_points(chain, xy, wh, rankdir)
        d = "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        out.append(f'<path d="{d}" marker-end="url(#arrow)"/>')
    out.append("</g>")
    for v, node in enumerate(nodes):
        if node.kind == "dummy":
            continue
        (x, y), (w, h) = xy[v], wh[v]
        name = escape(node.label[0])
        out.append(f'<g class="{node.kind}" id="{node.id}"><title>{name}</title>')
        if node.kind == "layer":
            out.append(
                f'<rect x="{x - w / 2:.1f}" y="{y - h / 2:.1f}" width="{w:.1f}" height="{h:.1f}" '
                f'rx="4" fill="{node.colour}" stroke="#333"/>'
            )
        else:
            out.append(
                f'<ellipse cx="{x:.1f}" cy="{y:.1f}" rx="{w / 2:.1f}" ry="{h / 2:.1f}" '
                f'fill="{node.colour}" stroke="#666"/>'
            )
        top = y - (len(node.label) - 1) * LINE_H / 2
        for k, line in enumerate(node.label):
            weight = ' font-weight="bold"' if k == 0 and node.kind == "layer" else ""
            out.append(
                f'<text x="{x:.1f}" y="{top + k * LINE_H:.1f}" text-anchor="middle" '
                f'dominant-baseline="central"{weight}>{escape(line)}</text>'
            )
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _dot_str(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(param, rankdir="TB"):
    """Graphviz text of a NetParameter (`dot -Tpng` renders it like Caffe's draw_net)."""
    nodes, edges = net_graph(param)
    out = [
        f"digraph {_dot_str(param.name or 'net')} {{",
        f"  rankdir={rankdir};",
        '  node [fontname="Helvetica", fontsize=12];',
    ]
    for node in nodes:
        label = _dot_str("\n".join(node.label)).replace("\n", "\\n")
        if node.kind == "layer":
            style = f'shape=box, style="rounded,filled", fillcolor="{node.colour}"'
        else:
            style = f'shape=ellipse, style=filled, fillcolor="{node.colour}"'
        out.append(f"  {node.id} [{style}, label={label}];")
    for a, b in edges:
        out.append(f"  {nodes[a].id} -> {nodes[b].id};")
    out.append("}")
    return "\n".join(out) + "\n"


def select_phase(param, phase):
    """The layers of `param` in a phase ("TRAIN" / "TEST"), or all of them ("ALL")."""
    if phase == "ALL":
        return param
    from engine.net import filter_net

    staged = caffe_pb2.NetParameter()
    staged.CopyFrom(param)
    staged.state.phase = caffe_pb2.Phase.Value(phase)
    return filter_net(staged)


def _phase_name(phase):
    """pycaffe passes None (all layers) or caffe.TRAIN / caffe.TEST; the CLI a name."""
    if phase is None:
        return "ALL"
    return phase if isinstance(phase, str) else caffe_pb2.Phase.Name(phase)


def draw_net_to_file(net, out_path, rankdir="LR", phase="ALL"):
    """Render a net (prototxt path or NetParameter) to .svg, or .dot text by extension
    (pycaffe's caffe.draw.draw_net_to_file; raster formats need Graphviz on the .dot)."""
    ext = os.path.splitext(str(out_path))[1].lower()
    if ext not in (".svg", ".dot"):
        raise ValueError(
            f"{out_path}: cannot draw to {ext or 'a file without extension'}: write .svg, or "
            ".dot and render that with Graphviz (dot -Tpng net.dot -o net.png)"
        )
    if isinstance(net, caffe_pb2.NetParameter):
        param, source = net, "<NetParameter>"
    else:
        source = str(net)
        param = io.read_net_param(source)
    param = select_phase(upgrade_net_param(param, source), _phase_name(phase))
    text = to_dot(param, rankdir) if ext == ".dot" else to_svg(param, rankdir)
    io.atomic_write_bytes(out_path, text.encode("utf-8"))
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description="Draw a Caffe net as SVG (or .dot).")
    parser.add_argument("net", help="net prototxt")
    parser.add_argument("output", help="output .svg (or .dot for Graphviz text)")
    parser.add_argument("--rankdir", choices=("LR", "TB"), default="LR",
                        help="direction of the drawing (default: left to right)")  # fmt: skip
    parser.add_argument("--phase", choices=("TRAIN", "TEST", "ALL"), default="ALL",
                        help="draw only the layers of this phase (default: all)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        draw_net_to_file(args.net, args.output, args.rankdir, args.phase)
    except (io.CaffeFileError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Drawing net to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
