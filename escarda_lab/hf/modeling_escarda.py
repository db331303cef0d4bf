"""Hugging Face glue for an exported escarda_lab model (copied into the export folder).

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

The architecture itself comes from the installed `escarda_lab` package (and its `components/`),
so loading needs `pip install escarda_lab`; the weights and the full config are in the folder.
The output head stays tied to the embedding when the run tied them (the parameter count is the
run's). Generation uses escarda_lab's own decoding cache as `past_key_values`: each step feeds
only the new tokens, and the logits equal the full forward's (a greedy or sampled search; beam
search would need the cache reordered and is refused).
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5 renamed `past_key_values` to `cache`; use whichever the installed version has.
CACHE = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


class EscardaConfig(PretrainedConfig):
    model_type = "escarda"

    def __init__(self, escarda: dict | None = None, **kwargs):
        self.escarda = escarda or {}
        super().__init__(**kwargs)


class EscardaForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = EscardaConfig
    base_model_prefix = "model"
    _no_split_modules: list[str] = []
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}  # used when tie_word_embeddings

    def __init__(self, config: EscardaConfig):
        super().__init__(config)
        from escarda_lab import config as escarda_config
        from escarda_lab.model import EscardaLM

        self.escarda_cfg = escarda_config.from_dict(config.escarda, source="config.json `escarda`")
        self.model = EscardaLM(self.escarda_cfg)
        self.post_init()

    def _init_weights(self, module):  # every weight comes from model.safetensors
        pass

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model.restore_buffers()
        return model

    def restore_buffers(self) -> None:
        """Recompute the buffers a checkpoint does not hold (RoPE tables, hash constants): the
        loader may build the module on the meta device, where they were never computed."""
        from escarda_lab.model import EscardaLM

        fresh = dict(EscardaLM(self.escarda_cfg).named_buffers())
        saved = set(self.model.state_dict())
        for name, _buf in list(self.model.named_buffers()):
            if name not in saved:
                owner, _, leaf = name.rpartition(".")
                mod = self.model.get_submodule(owner) if owner else self.model
                mod._buffers[leaf] = fresh[name].to(self.device)

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.head

    def forward(self, input_ids: torch.LongTensor, attention_mask=None, labels=None, use_cache=None, **kwargs):
        from escarda_lab.model import Cache

        given = kwargs.get("cache", kwargs.get("past_key_values"))
        cache = given if isinstance(given, Cache) else None
        if cache is None and use_cache and labels is None:
            cache = self.model.new_cache()
        ids = input_ids[:, cache.pos :] if cache is not None else input_ids  # only what the cache has not seen
        logits = self.model(ids, cache=cache).logits
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE: cache})

    def prepare_inputs_for_generation(self, input_ids, use_cache=True, **kwargs):
        from escarda_lab.model import Cache

        if kwargs.get("num_beams", 1) > 1:
            raise ValueError("escarda export: beam search needs a reorderable cache; use greedy or sampling")
        given = kwargs.get("cache", kwargs.get("past_key_values"))
        return {"input_ids": input_ids, CACHE: given if isinstance(given, Cache) else None, "use_cache": use_cache}

    def _supports_default_dynamic_cache(self) -> bool:  # our own cache, not transformers' DynamicCache
        return False
