"""NetParameter + NetState -> the layers Caffe would instantiate, in order.

Two passes, as Caffe's ``Net::Init`` does them:

- :func:`filter_net` (``Net::FilterNet`` / ``StateMeetsRule``): keep a layer when any ``include``
  rule matches the state, or, with only ``exclude`` rules, when none matches. A rule matches only if
  phase, min_level, max_level, *all* its ``stage`` s and *none* of its ``not_stage`` s match.
- :func:`insert_splits` (``InsertSplits``): a blob consumed by several layers gets an explicit
  ``Split`` layer right after its producer, with Caffe's names
  (``<blob>_<producer>_<top index>_split_<n>``), so blob names match pycaffe's and diffs sum as
  Caffe sums them. A loss weight on such a top moves to the split's first top.
"""

from __future__ import annotations

from collections.abc import Iterable

from caffeport.errors import CaffeportError
from caffeport.proto import caffe_pb2


def net_state(phase: int, level: int = 0, stages: Iterable[str] = ()) -> caffe_pb2.NetState:
    st = caffe_pb2.NetState()
    st.phase = phase
    st.level = level
    st.stage.extend(list(stages))
    return st


def _rule_matches(state: caffe_pb2.NetState, rule: caffe_pb2.NetStateRule) -> bool:
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def layer_included(state: caffe_pb2.NetState, layer: caffe_pb2.LayerParameter, source: str = "<net>") -> bool:
    """Caffe's StateMeetsRule applied to one layer."""
    if layer.include and layer.exclude:
        raise CaffeportError(
            f"{source}: layer '{layer.name}' has both include and exclude rules; Caffe allows only one kind"
        )
    if layer.include:
        return any(_rule_matches(state, r) for r in layer.include)
    return not any(_rule_matches(state, r) for r in layer.exclude)


def filter_net(net: caffe_pb2.NetParameter, state: caffe_pb2.NetState, source: str = "<net>") -> caffe_pb2.NetParameter:
    """A copy of ``net`` holding only the layers that ``state`` includes (state merged like Caffe:
    the net's own ``state`` field supplies defaults)."""
    merged = caffe_pb2.NetState()
    merged.CopyFrom(net.state)
    merged.phase = state.phase
    if state.HasField("level"):
        merged.level = state.level
    merged.stage.extend([s for s in state.stage if s not in merged.stage])
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    out.state.CopyFrom(merged)
    for layer in net.layer:
        if layer_included(merged, layer, source):
            out.layer.add().CopyFrom(layer)
    return out


def split_blob_name(layer_name: str, blob_name: str, top_idx: int, split_idx: int) -> str:
    return f"{blob_name}_{layer_name}_{top_idx}_split_{split_idx}"


def split_layer_name(layer_name: str, blob_name: str, top_idx: int) -> str:
    return f"{blob_name}_{layer_name}_{top_idx}_split"


def insert_splits(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """Caffe's InsertSplits: explicit Split layers for blobs with several consumers."""
    producer: dict[str, tuple[int, int]] = {}  # blob -> (layer idx, top idx) of its latest producer
    consumers: dict[tuple[int, int], int] = {}
    bottom_src: dict[tuple[int, int], tuple[int, int]] = {}
    loss_weight: dict[tuple[int, int], float] = {}
    for i, layer in enumerate(net.layer):
        for j, b in enumerate(layer.bottom):
            if b not in producer:
                continue  # reported by the net builder, which knows the file and layer
            src = producer[b]
            bottom_src[(i, j)] = src
            consumers[src] = consumers.get(src, 0) + 1
        for j, t in enumerate(layer.top):
            producer[t] = (i, j)
            if j < len(layer.loss_weight) and layer.loss_weight[j]:
                # An explicitly loss-weighted top counts as one more consumer (Caffe's rule), so a
                # weighted top that also feeds a layer gets a split whose first top carries the loss.
                loss_weight[(i, j)] = layer.loss_weight[j]
                consumers[(i, j)] = consumers.get((i, j), 0) + 1
    if not any(c > 1 for c in consumers.values()):
        return net
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    # Split tops handed to consumers start at 1 when top 0 carries the loss weight.
    split_next: dict[tuple[int, int], int] = {k: 1 for k in loss_weight if consumers.get(k, 0) > 1}
    for i, layer in enumerate(net.layer):
        new = out.layer.add()
        new.CopyFrom(layer)
        for j, b in enumerate(layer.bottom):
            src = bottom_src.get((i, j))
            if src is not None and consumers[src] > 1:
                k = split_next.get(src, 0)
                split_next[src] = k + 1
                new.bottom[j] = split_blob_name(net.layer[src[0]].name, b, src[1], k)
        for j, t in enumerate(layer.top):
            n = consumers.get((i, j), 0)
            if n <= 1:
                continue
            split = out.layer.add()
            split.name = split_layer_name(layer.name, t, j)
            split.type = "Split"
            split.bottom.append(t)
            lw = loss_weight.get((i, j), 0.0)
            for k in range(n):
                split.top.append(split_blob_name(layer.name, t, j, k))
                if lw:
                    split.loss_weight.append(lw if k == 0 else 0.0)
            if lw:
                del new.loss_weight[:]  # Caffe clears the producer's loss weights
    return out
