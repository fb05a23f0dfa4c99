"""Named adapters in one layer: the bank of adapters a layer holds besides
its live one, and the per-example factors of a mixed batch.

A layer carrying an adapter computes with its live variables (`A`, `B`, and
DoRA's magnitude): the *active* adapter, which trains. Every other named
adapter is kept in non-trainable variables of its own,
`adapter__<name>__<factor>`, in the same layer, with its own `LoRAConfig`
(rank, alpha, scaling rule, DoRA). Making another adapter active copies
values between the two (so what a layer computes stays a matter of
variable values, seen by every compiled function). Once a second adapter
exists, every adapter has bank variables, the active one's too (refreshed
when another becomes active), and the layer an integer variable,
`adapter__active_key`, holding a key of the active adapter's name: a mixed
batch reads an adapter from the live variables where the key says it is
active, from its bank variables otherwise, so a function traced before
`set_adapter` routes by the new values, not by the Python state it was
traced with.

A mixed batch (`routing.py`) gives each example an adapter, and the step
stays factored: `h@W + (h@A_b)@(s B_b)` per example `b`, with DoRA's column
scale per example. A `Dense`-like layer gathers each example's factors once
per call (ranks padded to the largest, each `B` times its own scale). A
recurrent cell, which multiplies at every step, keeps every adapter's
factors side by side, once per call (once per decoding, see
`routing.prepared`), and masks each example's columns:
`((h@A) * mask)@B`. An example routed to no adapter computes the base
model.
"""

import keras
import numpy as np

from keras_rnn_lora import folding
from keras_rnn_lora import keras_internals
from keras_rnn_lora import lora
from keras_rnn_lora import routing
from keras_rnn_lora import variants
from keras_rnn_lora.checks import check_adapter_name
from keras_rnn_lora.routing import magnitude_name
from keras_rnn_lora.routing import name_key

#: The name of the adapter a layer is converted with.
DEFAULT_ADAPTER = "default"


def bank_weight_name(adapter, factor):
    """The variable name of `factor` of banked adapter `adapter`."""
    return f"adapter__{adapter}__{factor}"


#: The variable holding `name_key(active adapter)` (see module).
ACTIVE_KEY = "adapter__active_key"


class AdapterBank(routing.RoutedFactors):
    """The named adapters of a layer (see module); part of
    `merging.MergeableLoRA`."""

    def init_bank(self, named_adapters, active_adapter):
        """From the constructor: `named_adapters` maps every adapter's name,
        in the order they were added, to its `LoRAConfig` as a dict (`None`
        for the live one); `active_adapter` names the live one."""
        self.active_adapter = check_adapter_name(
            active_adapter or DEFAULT_ADAPTER
        )
        named = dict(named_adapters or {self.active_adapter: None})
        self.adapter_order = [check_adapter_name(n) for n in named]
        if self.active_adapter not in named:
            self.adapter_order.insert(0, self.active_adapter)
        self.bank_configs = {
            name: config
            if isinstance(config, lora.LoRAConfig)
            else lora.LoRAConfig(**config)
            for name, config in named.items()
            if name != self.active_adapter
        }
        self._bank = {}  # name -> {factor name: variable}
        self._active_key = None  # the ACTIVE_KEY variable, with >1 adapter

    def build_bank(self):
        """Creates the variables of the named adapters (at `build`): none
        for a single adapter."""
        if len(self.adapter_order) > 1:
            self._add_slots()

    def _add_slots(self):
        """Bank variables for every adapter that has none (the active one's
        included), and the active-key variable."""
        for name in self.adapter_order:
            if name not in self._bank:
                self._bank[name] = self._bank_variables(
                    name, self.adapter_config(name)
                )
        if self._active_key is None:
            with keras_internals.weights_addable(self):
                self._active_key = self.add_weight(
                    name=ACTIVE_KEY,
                    shape=(),
                    initializer=keras.initializers.Constant(
                        name_key(self.active_adapter)
                    ),
                    dtype="int32",
                    trainable=False,
                    autocast=False,
                )

    def _bank_variables(self, name, config):
        variables = {}
        with keras_internals.weights_addable(self):
            for target in config.lora_targets:
                a, b = self.lora_factors(target)
                shapes = {
                    a.name: (*a.shape[:-1], config.rank),
                    b.name: (config.rank, b.shape[-1]),
                }
                if config.use_dora:
                    shapes[magnitude_name(a)] = (b.shape[-1],)
                for factor, shape in shapes.items():
                    variables[factor] = self.add_weight(
                        name=bank_weight_name(name, factor),
                        shape=shape,
                        initializer="zeros",
                        dtype="float32",
                        trainable=False,
                        autocast=False,
                    )
        return variables

    def bank_weights(self):
        """Every banked adapter's variables and the active key (none
        trainable)."""
        weights = [
            v for variables in self._bank.values() for v in variables.values()
        ]
        if self._active_key is not None:
            weights.append(self._active_key)
        return weights

    # -- the adapters a layer holds -------------------------------------------

    def adapter_names(self):
        """The names of the adapters this layer holds, in the order they
        were added."""
        return list(self.adapter_order)

    def adapter_config(self, name):
        if name == self.active_adapter:
            return self.lora_config
        return self.bank_configs[name]

    def adapter_shapes(self, name):
        """`{factor name: shape}` of adapter `name`."""
        if name == self.active_adapter:
            return {w.name: tuple(w.shape) for w in self.lora_weights}
        return {f: tuple(v.shape) for f, v in self._bank[name].items()}

    def adapter_values(self, name):
        """The factors of adapter `name` as NumPy arrays (factor name ->
        array, in the adapter's own shapes)."""
        if name == self.active_adapter:
            return self.factor_values()
        return {
            factor: lora.to_numpy(variable)
            for factor, variable in self._bank[name].items()
        }

    def check_adapter_values(self, name, values):
        """`values` (factor name -> array) for adapter `name`, checked as
        `set_adapter_values` takes them (names, shapes, finite), as
        float32; changes nothing."""
        if name == self.active_adapter:
            return self.check_lora_factors(values)
        return folding.checked_factors(
            f"'{self.name}': adapter {name!r}",
            self.adapter_shapes(name),
            values,
        )

    def set_adapter_values(self, name, values):
        """Assigns adapter `name`'s factors (see `check_adapter_values`)."""
        arrays = self.check_adapter_values(name, values)
        if name == self.active_adapter:
            self.set_lora_factors(arrays)
        else:
            self._assign_bank(name, arrays)

    def add_banked_adapter(self, name, config, values=None):
        """Adds adapter `name` with `config` to the bank: fresh (`A` from the
        initializer, `B = 0`, DoRA's magnitude from the kernel) unless
        `values` are given."""
        self.check_addable(name, config)
        self._add_slots()  # the active adapter's, on a second adapter
        variables = self._bank_variables(name, config)
        self.bank_configs[name] = config
        self._bank[name] = variables
        self.adapter_order.append(name)
        if values is None:
            values = self._fresh_values(config, variables)
        self._assign_bank(name, values)

    def check_addable(self, name, config):
        """Raises `ValueError` unless `add_banked_adapter(name, config)` can
        run; changes nothing."""
        self.require_built("add_adapter")
        check_adapter_name(name)
        if name in self.adapter_names():
            raise ValueError(
                f"'{self.name}' already holds an adapter named {name!r}."
            )
        clash = [
            n for n in self.adapter_names() if name_key(n) == name_key(name)
        ]
        if clash:
            raise ValueError(
                f"Adapter name {name!r} has the same key as {clash[0]!r} "
                f"held by '{self.name}': choose another name."
            )
        unknown = set(config.lora_targets) - set(self.lora_targets)
        if unknown:
            raise ValueError(
                f"'{self.name}' adapts {self.lora_targets}; an adapter on "
                f"{sorted(unknown)} needs another conversion."
            )
        if config.lora_init != "default":
            raise ValueError(
                "Received an invalid value for `lora_init`, expected "
                "'default' for an added adapter: PiSSA and OLoRA change the "
                "frozen kernel every adapter of the layer shares. Received: "
                f"lora_init={config.lora_init!r}"
            )

    def _fresh_values(self, config, variables):
        values = {}
        a_init = lora.new_initializer(config.lora_a_initializer)
        for factor, variable in variables.items():
            if factor.endswith("_a"):
                values[factor] = lora.to_numpy(
                    a_init(variable.shape, dtype="float32")
                )
            elif factor.endswith("_b"):
                values[factor] = np.zeros(variable.shape, "float32")
        for target in config.lora_targets:
            if config.use_dora:
                name = magnitude_name(self.lora_factors(target)[0])
                kernel = self.base_kernel(target)
                values[name] = variants.column_norms_numpy(kernel).astype(
                    "float32"
                )
        return values

    def _assign_bank(self, name, values):
        variables = self._bank[name]
        if set(values) != set(variables):
            raise ValueError(
                f"'{self.name}': adapter {name!r} has the factors "
                f"{sorted(variables)}; received values for {sorted(values)}."
            )
        for factor, value in values.items():
            if tuple(np.shape(value)) != tuple(variables[factor].shape):
                raise ValueError(
                    f"'{self.name}': factor {factor!r} of adapter {name!r} "
                    f"has shape {tuple(variables[factor].shape)}; received "
                    f"{tuple(np.shape(value))}."
                )
            variables[factor].assign(np.asarray(value, "float32"))

    def remove_banked_adapter(self, name):
        if name == self.active_adapter:
            raise ValueError(
                f"Adapter {name!r} is active in '{self.name}': make another "
                "one active first (`keras_rnn_lora.set_adapter`)."
            )
        removed = list(self._bank.pop(name).values())
        del self.bank_configs[name]
        self.adapter_order.remove(name)
        if len(self.adapter_order) == 1:  # as a layer with one adapter
            removed += self.bank_weights()
            self._bank, self._active_key = {}, None
        keras_internals.untrack_weights(self, removed)

    def check_activatable(self, name):
        """Raises `ValueError` unless `activate(name)` can run: unmerged,
        and the adapter's rank, targets, scale, DoRA and dropout are the
        live variables'."""
        if name == self.active_adapter:
            return
        self.require_built("set_adapter")
        self._require_unmerged("set_adapter")
        different = self._config_differences(self.bank_configs[name])
        if different:
            raise ValueError(
                f"Adapter {name!r} differs from the trainable one in "
                f"{different}: it can be served (`call_with_adapters`, the "
                "export) but not made active."
            )

    def activate(self, name):
        """Makes banked adapter `name` the live one; the live one goes to the
        bank (see `check_activatable`)."""
        if name == self.active_adapter:
            return
        self.check_activatable(name)
        incoming = self.adapter_values(name)
        self._assign_bank(self.active_adapter, self.factor_values())
        for weight in self.lora_weights:
            weight.assign(incoming[weight.name])
        self._active_key.assign(name_key(name))
        del self.bank_configs[name]
        self.bank_configs[self.active_adapter] = self.lora_config
        self.active_adapter = name

    def _config_differences(self, config):
        """What of `config` differs from the live adapter's, of what the
        live variables fix (rank, targets, scale, DoRA, dropout)."""
        fixed = ("rank", "lora_targets", "scaling", "use_dora", "lora_dropout")
        return [
            key
            for key in fixed
            if getattr(config, key) != getattr(self.lora_config, key)
        ]

    def _activatable_config(self, config):
        return not self._config_differences(config)

    def stored_active_adapter(self, bank_values):
        """The adapter a stored layer's live variables hold, by its stored
        active key (`bank_values`: stored bank weights by name): the
        file's, whichever is active here. Raises `ValueError` for a key of
        no adapter this layer can make active; changes nothing."""
        if self._active_key is None or ACTIVE_KEY not in bank_values:
            return self.active_adapter
        key = int(np.asarray(bank_values[ACTIVE_KEY]))
        for name in self.adapter_order:
            if name_key(name) == key:
                if name != self.active_adapter:
                    self.check_activatable(name)
                return name
        raise ValueError(
            f"'{self.name}': the stored weights were saved with an active "
            f"adapter this layer does not hold (it holds "
            f"{self.adapter_order})."
        )

    def load_bank(self, bank_values, active):
        """Assigns the bank's variables from `bank_values` (by name) and
        records `active` (from `stored_active_adapter`) as the adapter the
        live variables hold, loaded with it."""
        for weight in self.bank_weights():
            weight.assign(bank_values[weight.name])
        if active == self.active_adapter:
            return
        del self.bank_configs[active]
        self.bank_configs[self.active_adapter] = self.lora_config
        self.active_adapter = active

    def require_routable(self):
        """Raises `ValueError` unless a mixed batch can run here: unmerged
        (a merged kernel holds the active adapter for every example)."""
        self._require_unmerged("call_with_adapters")

    def _require_unmerged(self, method):
        if self.lora_merged:
            raise ValueError(
                f"`{method}` needs '{self.name}' unmerged: its kernel holds "
                "the active adapter. Call `keras_rnn_lora.unmerge_lora` "
                "first."
            )

    def bank_config_entries(self):
        if len(self.adapter_order) == 1:  # one adapter: as without names
            named = None
        else:
            named = {
                name: None
                if name == self.active_adapter
                else self.bank_configs[name].to_dict()
                for name in self.adapter_order
            }
        return {"active_adapter": self.active_adapter, "named_adapters": named}
