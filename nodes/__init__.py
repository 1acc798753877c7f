"""ComfyUI nodes. Each module holds one family and exports NODES = {node_id: (class, display name)}.

Node ids, input names and widget order never change once shipped: saved workflows depend on them.
"""

from . import (adapter_ops, adapters, caching, compose, diffedit, dit_edit, dit_loaders, editing, loaders, quant,
               sampling)

_FAMILIES = (sampling, adapters, loaders, adapter_ops, quant, editing, diffedit, dit_loaders, caching, compose,
             dit_edit)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _family in _FAMILIES:
    for _node_id, (_cls, _display) in _family.NODES.items():
        NODE_CLASS_MAPPINGS[_node_id] = _cls
        NODE_DISPLAY_NAME_MAPPINGS[_node_id] = _display
