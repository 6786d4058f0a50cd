"""Hugging Face transformers classes for the models ``pretrained.save_pretrained`` writes.

``save_pretrained`` copies this file, ``gam_model.py`` and ``baselines.py`` into every model
folder and names the two classes below in its config.json (``auto_map``), so

>>> from transformers import AutoModelForCausalLM, AutoTokenizer
>>> model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
>>> tokenizer = AutoTokenizer.from_pretrained(folder)

opens the folder in a process that has transformers but not this repository. The wrapper holds
no model code of its own: it builds the saved family's class (``baselines.FAMILIES``) and
adopts that model's modules as its own, so the parameter names, and so the weights file, are
those of the repository's model, and every number comes from the repository's forward and
decoding code.

Only this module imports transformers; the rest of the repository runs without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from torch.nn import functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from baselines import FAMILIES
from gam_model import ModelConfig

__all__ = ["GAMReproductionConfig", "GAMReproductionForCausalLM", "DecodingState"]

MODEL_TYPE = "gam-reproduction"
PRETRAINED_FORMAT = "gam-reproduction-causal-lm-v1"  # = pretrained.PRETRAINED_FORMAT (pretrained.py is not copied)
MIN_TRANSFORMERS = (5, 0)  # the dict form of _tied_weights_keys; GenerationMixin not inherited
if tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit()) < MIN_TRANSFORMERS:
    raise ImportError(f"these models need transformers>={'.'.join(map(str, MIN_TRANSFORMERS))}, "
                      f"found {transformers.__version__}: pip install -U transformers")


class GAMReproductionConfig(PretrainedConfig):
    """The folder's config.json as transformers reads it: the repository's keys (``format``,
    ``family``, ``model_config``, ``family_config``, ``dtype``, ``tied_weights``) as
    ``pretrained.from_pretrained`` reads them, and the usual transformers names
    (``vocab_size``, ``max_position_embeddings``, ...) derived from ``model_config`` so that
    generic tools find them."""

    model_type = MODEL_TYPE

    def __init__(self, family: str = "gam", model_config: dict | None = None, family_config: dict | None = None,
                 format: str = PRETRAINED_FORMAT, tied_weights: dict | None = None, use_cache: bool = True,
                 tie_word_embeddings: bool = True, **kwargs):
        if family not in FAMILIES:
            raise ValueError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")
        self.format, self.family = format, family
        self.model_config = ModelConfig(**(model_config or {})).to_dict()  # checked, defaults filled
        self.family_config = dict(family_config or {})
        self.tied_weights = dict(tied_weights or {"token_embedding.weight": "head.weight"})
        self.use_cache = use_cache
        for name in ("vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers"):
            kwargs.pop(name, None)  # derived, never read back: model_config is the one truth
        mc = self.model_config
        self.vocab_size, self.max_position_embeddings = mc["VOCAB_SIZE"], mc["BLOCK_SIZE"]
        self.hidden_size, self.num_hidden_layers = mc["N_EMBED"], mc["N_LAYER"]
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def to_diff_dict(self) -> dict:
        """transformers writes only what differs from a default config; the repository's keys
        are always written, so that a folder transformers saves still opens with
        pretrained.from_pretrained."""
        return {**super().to_diff_dict(), **{k: getattr(self, k) for k in _REPOSITORY_KEYS}}


_REPOSITORY_KEYS = ("format", "family", "model_config", "family_config", "tied_weights")


def build_lm(config: GAMReproductionConfig):
    """The repository's model of the saved family. Mamba gets the pure-PyTorch mixer: transformers
    builds the model before it knows the device (on "meta"), and it runs on any device."""
    kwargs = dict(config.family_config)
    if config.family == "mamba":
        kwargs["impl"] = "torch"
    return FAMILIES[config.family](ModelConfig(**config.model_config), **kwargs)


@dataclass
class GAMReproductionOutput(ModelOutput):
    """``loss`` (with labels), ``logits`` (B, T, V) and, while generating, ``decoding_state``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    decoding_state: DecodingState | None = None


class DecodingState:
    """The repository's decoding states (``CausalLM.next_logits``) as generate's cache: the ids
    they describe and the per-block states after them. A call whose ids are not these ids plus
    one new token (a reordered beam, an edited prompt) re-encodes from the start, so the cache
    can make decoding cheaper but never different."""

    def __init__(self):
        self.ids, self.states = None, None

    def next_logits(self, lm, ids: torch.Tensor) -> torch.Tensor:
        """The logits (B, V) of the token after ``ids`` (B, T); the state then describes ids."""
        follows = (self.ids is not None and ids.shape[0] == self.ids.shape[0]
                   and ids.shape[1] == self.ids.shape[1] + 1 and torch.equal(ids[:, :-1], self.ids))
        streaming = lm.use_cache and lm._can_stream()
        logits, self.states = lm.next_logits(ids, self.states if follows else None, streaming)
        self.ids = ids
        return logits


class GAMReproductionForCausalLM(PreTrainedModel, GenerationMixin):
    """A saved model of any family (GAM, Transformer, Mamba) as a transformers causal LM.

    ``forward(input_ids, labels=None)`` returns the logits of every position (the repository
    model's checked forward: at most BLOCK_SIZE tokens) and, with ``labels``, the mean
    next-token loss in the transformers convention (labels are the inputs, shifted inside;
    -100 ignored). ``generate`` (GenerationMixin; PreTrainedModel no longer brings it) decodes
    with the repository's decoding state as its cache (``use_cache=True``, the default) or
    re-encodes the context, cropped to its last BLOCK_SIZE tokens, per new token
    (``use_cache=False``): the two decoding modes of the repository's own ``generate``.
    There is no attention mask (the models have none): padding is refused.
    """

    config_class = GAMReproductionConfig
    main_input_name = "input_ids"
    # transformers 5: {target: source}; the weights file holds head.weight only.
    _tied_weights_keys = {"token_embedding.weight": "head.weight"}
    _no_split_modules = ["GAMBlock", "TransformerBlock", "TorchMamba", "MambaResidualBlock"]  # device_map: whole blocks

    def __init__(self, config: GAMReproductionConfig):
        super().__init__(config)
        lm = build_lm(config)
        # The repository model's modules become this model's own (so its parameter names are
        # the weights file's); the model itself is kept unregistered, to run its methods on them.
        for name, module in lm.named_children():
            self.add_module(name, module)
        self.__dict__["lm"] = lm
        self.post_init()

    def _init_weights(self, module):
        """Nothing: the repository's constructors initialise their parameters (transformers' own
        scheme would replace that), and a loaded model has all of them in its file."""

    def train(self, mode: bool = True):
        super().train(mode)
        self.lm.training = mode  # the shared modules follow super(); the unregistered frame too
        return self

    def get_input_embeddings(self):
        return self.token_embedding

    def get_output_embeddings(self):
        return self.head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is DecodingState: no transformers Cache is made for it

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, decoding_state: DecodingState | None = None,
                return_dict: bool | None = None, **kwargs):
        """Logits (B, T, V) of input_ids (B, T); with ``decoding_state`` (generate's cache) the
        logits (B, 1, V) of the token after input_ids, the whole sequence so far."""
        _refuse_padding(attention_mask)
        if decoding_state is not None:
            if labels is not None:
                raise ValueError("labels and decoding_state: the loss needs the logits of every position; "
                                 "call without decoding_state")
            logits = decoding_state.next_logits(self.lm, input_ids)[:, None]       # (B, 1, V)
        else:
            logits = self.lm(input_ids)[0]                                         # (B, T, V)
        loss = None if labels is None else _next_token_loss(logits, labels)
        out = GAMReproductionOutput(loss=loss, logits=logits, decoding_state=decoding_state)
        return out if return_dict is not False else out.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, decoding_state: DecodingState | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool | None = None,
                                      **kwargs) -> dict:
        """All ids so far and the decoding state (use_cache), or the context cropped to its last
        BLOCK_SIZE tokens (re-encoding). Everything else transformers passes is not used."""
        if self.config.use_cache if use_cache is None else use_cache:
            return {"input_ids": input_ids, "attention_mask": attention_mask,
                    "decoding_state": decoding_state if decoding_state is not None else DecodingState()}
        crop = self.lm.config.BLOCK_SIZE
        return {"input_ids": input_ids[:, -crop:],
                "attention_mask": None if attention_mask is None else attention_mask[:, -crop:]}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs: dict, *args, **kwargs) -> dict:
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if getattr(outputs, "decoding_state", None) is not None:
            model_kwargs["decoding_state"] = outputs.decoding_state  # carried to the next step
        return model_kwargs


def _refuse_padding(attention_mask: torch.Tensor | None) -> None:
    """The models see every position (absolute positions, causal convolutions, no mask): a
    padded batch would mix the pads into the logits, so it is an error, not a silent change."""
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("attention_mask has zeros (padding), which these models cannot skip: "
                         "generate prompts of one length together, or one prompt at a time")


def _next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss: position t predicts labels[t+1]; -100 is ignored."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1).long(),
                           ignore_index=-100)
