"""Text- and image-conditioned latent diffusion (prostate_text_ldm; prostate spec sections 2-3).

The denoiser is a MONAI ``DiffusionModelUNet`` with cross-attention whose context is the token states of a text
encoder trained jointly with it (:class:`TextConditionedUNet`). A paired image (the T2W slice when generating DW)
can condition it in two ways, chosen by ``pairing``:

- ``"crossattn"`` (the chapter's mechanism): a separately trained, frozen :class:`ImageCodeAutoencoder` (3 down,
  3 up, 128-d code) encodes the paired image; ``Linear(128, d)`` of that code is appended to the text tokens as one
  more context token (zero token without an image);
- ``"concat"`` (our spatial pathway): the paired image's autoencoder latent (posterior mean times the scale factor)
  is concatenated to the noisy latent along channels (zeros without an image), so the U-Net sees where things are;
- ``"none"``: text only.

Classifier-free guidance (our addition): in training, the whole context is replaced by -1 for dropped samples and
the concatenated pair latent by zeros (:func:`~medgen_common.guidance.condition_dropout_masks`), the same nulls
:class:`TextLatentSampler` uses with :func:`~medgen_common.guidance.double_guidance`: text scale first, then the pair.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.engines import DiffusionPrepareBatch
from monai.inferers import Inferer
from monai.transforms import MapTransform, Randomizable
from monai.utils import convert_to_tensor
from torch import nn

from .guidance import (
    CONCAT,
    CONTEXT,
    classifier_free_guidance,
    condition_dropout_masks,
    double_guidance,
    guided_sample,
    null_where,
)
from .runtime import autocast_dtype, autocast_enabled
from .text import make_prompt

__all__ = [
    "PAIRINGS",
    "ImageCodeAutoencoder",
    "TextConditionedUNet",
    "RandPromptd",
    "Tokenized",
    "TextDiffusionPrepareBatch",
    "TextDiffusionInferer",
    "TextLatentSampler",
    "paired_latent",
]

PAIRINGS = ("none", "concat", "crossattn")


def _check_pairing(pairing: str) -> str:
    if pairing not in PAIRINGS:
        raise ValueError(f"unknown pairing {pairing!r}; expected one of {PAIRINGS}.")
    return pairing


class ImageCodeAutoencoder(nn.Module):
    """The chapter's image auto-encoder (L1188-1190): stride-2 convolutions down to a ``code_dim`` vector, mirrored
    transposed convolutions back. ``encode`` ``[B, 1, H, W]`` -> ``[B, code_dim]``; ``forward`` reconstructs.

    Args:
        image_size: ``(H, W)``, each divisible by ``2 ** len(channels)``.
        channels: widths of the down-sampling convolutions (three in the chapter; more for large images).
        code_dim: length of the code (128 in the chapter).
    """

    def __init__(
        self,
        image_size: Sequence[int],
        channels: Sequence[int] = (16, 32, 32),
        code_dim: int = 128,
        in_channels: int = 1,
    ):
        super().__init__()
        factor = 2 ** len(channels)
        if any(int(s) % factor for s in image_size):
            raise ValueError(
                f"image_size {list(image_size)} must be divisible by {factor} for {len(channels)} down-samplings."
            )
        self.bottleneck = (int(channels[-1]), *[int(s) // factor for s in image_size])
        down, width = [], in_channels
        for out in channels:
            down += [nn.Conv2d(width, out, 4, stride=2, padding=1), nn.SiLU()]
            width = out
        self.encoder = nn.Sequential(*down, nn.Flatten(), nn.Linear(int(np.prod(self.bottleneck)), code_dim))
        up = []
        for out in [*channels[-2::-1], channels[0]]:  # mirrored widths back to the first
            up += [nn.ConvTranspose2d(width, out, 4, stride=2, padding=1), nn.SiLU()]
            width = out
        self.decoder_input = nn.Linear(code_dim, int(np.prod(self.bottleneck)))
        self.decoder = nn.Sequential(*up, nn.Conv2d(width, in_channels, 3, padding=1))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.decoder_input(code).view(-1, *self.bottleneck))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))


class TextConditionedUNet(nn.Module):
    """A ``DiffusionModelUNet`` (``with_conditioning``) and the text encoder that makes its context, trained together.

    ``forward(x, timesteps, context)`` is the U-Net's own call (sampling, guidance); ``forward(x, timesteps,
    tokens=..., image_code=..., keep_text=...)`` encodes the context inside the call (training, so DDP sees every
    parameter used in ``forward``).

    Args:
        unet: the denoiser; its ``cross_attention_dim`` equals the encoder's output width.
        text_encoder: token ids ``[B, L]`` -> ``[B, L, d]`` (e.g. :class:`~medgen_common.text.TextEncoder`).
        image_code_dim: length of the paired-image code appended as a context token (``"crossattn"`` pairing);
            0 for none.
        embedding_dim: ``d``.
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, image_code_dim: int = 0, embedding_dim: int = 512):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        # no bias: a zero code (no paired image) gives the zero token
        self.image_token = nn.Linear(image_code_dim, embedding_dim, bias=False) if image_code_dim > 0 else None

    def encode_context(
        self, tokens: torch.Tensor, image_code: torch.Tensor | None = None, keep_text: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Context ``[B, L (+ 1), d]``: text token states, then the image token when the model has one (zeros when
        ``image_code`` is None); samples where ``keep_text`` ``[B]`` is False get the -1 null (whole context)."""
        context = self.text_encoder(tokens)
        if self.image_token is not None:
            if image_code is None:
                token = context.new_zeros(context.shape[0], 1, context.shape[2])
            else:
                if image_code.shape != (context.shape[0], self.image_token.in_features):
                    raise ValueError(
                        f"image_code must be [B, {self.image_token.in_features}] = [{context.shape[0]}, "
                        f"{self.image_token.in_features}], got {tuple(image_code.shape)}."
                    )
                token = self.image_token(image_code.to(context.dtype))[:, None]
            context = torch.cat([context, token], dim=1)
        elif image_code is not None:
            raise ValueError("this model has no image token (image_code_dim=0) but an image_code was given.")
        if keep_text is not None:
            context = null_where(context, ~keep_text.bool(), CONTEXT)
        return context

    def forward(self, x, timesteps, context=None, tokens=None, image_code=None, keep_text=None):
        if tokens is not None:
            if context is not None:
                raise ValueError("give either context or tokens, not both.")
            context = self.encode_context(tokens, image_code, keep_text)
        if context is None:
            raise ValueError("a text-conditioned U-Net needs context or tokens.")
        return self.unet(x, timesteps, context=context)


class RandPromptd(Randomizable, MapTransform):
    """Draw one sequence of a multi-sequence case and a prompt for it, as the chapter draws a template per load.

    Reads the loaded images ``data[s]`` for each ``s`` in ``sequences`` and ``data[label_key]`` (lesion present,
    0/1); draws a sequence with probabilities ``sequence_weights`` (normalised; uniform by default); writes
    ``image`` (the drawn sequence), ``sequence`` (its index in ``sequences``), ``prompt``
    (:func:`~medgen_common.text.make_prompt`), and the pair: ``paired_image`` is ``data[pair_source]`` with
    probability ``pair_probability`` when the drawn sequence is ``paired_sequence``, else zeros; ``paired`` says
    which (0/1). Deterministic given ``set_random_state``.
    """

    def __init__(
        self,
        sequences: Sequence[str] = ("t2w", "adc", "dwi"),
        label_key: str = "lesion_present",
        paired_sequence: str = "dwi",
        pair_source: str = "t2w",
        pair_probability: float = 0.0,
        sequence_weights: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, list(sequences), allow_missing_keys)
        if not 0.0 <= pair_probability <= 1.0:
            raise ValueError(f"pair_probability must be in [0, 1], got {pair_probability}.")
        weights = np.ones(len(sequences)) if sequence_weights is None else np.asarray(sequence_weights, dtype=float)
        if weights.shape != (len(sequences),) or np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(
                f"sequence_weights must give one non-negative weight per sequence {list(sequences)}, got {sequence_weights}."
            )
        self.probabilities = weights / weights.sum()
        self.sequences, self.label_key = list(sequences), label_key
        self.paired_sequence, self.pair_source, self.pair_probability = (
            paired_sequence,
            pair_source,
            float(pair_probability),
        )

    def __call__(self, data):
        d = dict(data)
        for key in self.sequences + [self.label_key]:
            if key not in d:
                raise KeyError(f"RandPromptd needs '{key}' in every item; it has {sorted(d)}.")
        index = int(self.R.choice(len(self.sequences), p=self.probabilities))
        sequence = self.sequences[index]
        d["image"], d["sequence"] = d[sequence], index
        d["prompt"] = make_prompt(self.R, sequence, bool(int(d[self.label_key])))
        paired = sequence == self.paired_sequence and self.R.rand() < self.pair_probability
        d["paired_image"] = d[self.pair_source] if paired else torch.zeros_like(torch.as_tensor(d[sequence]))
        d["paired"] = int(paired)
        return d


class Tokenized(MapTransform):
    """``data["tokens"]`` = ``tokenizer(data[key])[0]`` (long ``[max_length]``) for a prompt string ``data[key]``."""

    def __init__(self, keys: KeysCollection = "prompt", tokenizer=None, output_key: str = "tokens"):
        super().__init__(keys)
        if tokenizer is None:
            raise ValueError("Tokenized needs a tokenizer (medgen_common.text.make_tokenizer).")
        self.tokenizer, self.output_key = tokenizer, output_key

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key] = self.tokenizer(str(d[key]))[0]
        return d


@torch.no_grad()
def paired_latent(autoencoder: nn.Module, images: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """The concat pathway's condition: the posterior mean of ``images`` ``[B, 1, H, W]`` times ``scale_factor``
    (deterministic, in training and sampling alike)."""
    autoencoder.eval()
    return convert_to_tensor(autoencoder.encode(images.float())[0] * scale_factor, track_meta=False)


class TextDiffusionPrepareBatch(DiffusionPrepareBatch):
    """Training batch for ``SupervisedTrainer`` + :class:`TextDiffusionInferer`.

    Batch keys: ``image`` ``[B, 1, H, W]`` (the target), ``tokens`` ``[B, L]``, and with pairing ``paired_image``
    ``[B, 1, H, W]`` and ``paired`` ``[B]``. The target is encoded with the frozen autoencoder (a posterior sample
    times ``scale_factor``); paired samples get their condition (concat: :func:`paired_latent`; crossattn: the
    frozen ``image_encoder``'s code), unpaired ones zeros. Dropout for guidance, one draw per sample
    (:func:`~medgen_common.guidance.condition_dropout_masks`): the text (whole context to -1) alone with
    ``p_text_only_dropped``, the pair alone with ``p_pair_only_dropped``, both with ``p_both_dropped``.

    Returns ``(latents, noise, (), {"noise", "timesteps", "tokens", "keep_text"[, "paired_latent" | "image_code"]})``.
    """

    def __init__(
        self,
        num_train_timesteps: int,
        autoencoder: nn.Module,
        scale_factor: float = 1.0,
        pairing: str = "none",
        image_encoder: nn.Module | None = None,
        p_text_only_dropped: float = 0.1,
        p_pair_only_dropped: float = 0.1,
        p_both_dropped: float = 0.05,
    ):
        super().__init__(num_train_timesteps=num_train_timesteps)
        self.autoencoder, self.scale_factor, self.pairing = autoencoder, float(scale_factor), _check_pairing(pairing)
        if pairing == "crossattn" and image_encoder is None:
            raise ValueError("crossattn pairing needs the trained image_encoder (ImageCodeAutoencoder).")
        self.image_encoder = image_encoder
        self.rates = (p_pair_only_dropped, p_text_only_dropped, p_both_dropped)
        condition_dropout_masks(1, *self.rates)  # checks the rates

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        def get(key: str) -> torch.Tensor:
            return convert_to_tensor(batchdata[key], track_meta=False).to(device, non_blocking=non_blocking)

        images = get("image").float()
        self.autoencoder.eval()
        with torch.no_grad():
            latents = convert_to_tensor(
                self.autoencoder.encode_stage_2_inputs(images) * self.scale_factor, track_meta=False
            )
        noise, timesteps = self.get_noise(latents), self.get_timesteps(latents)
        text_dropped, pair_dropped = condition_dropout_masks(latents.shape[0], *self.rates, device=latents.device)
        infer_kwargs = {
            "noise": noise,
            "timesteps": timesteps,
            "tokens": get("tokens").long(),
            "keep_text": ~text_dropped,
        }
        if self.pairing != "none":
            present = get("paired").bool().flatten() & ~pair_dropped
            paired_images = get("paired_image").float()
            if self.pairing == "concat":
                infer_kwargs["paired_latent"] = null_where(
                    paired_latent(self.autoencoder, paired_images, self.scale_factor), ~present, CONCAT
                )
            else:
                self.image_encoder.eval()
                with torch.no_grad():
                    infer_kwargs["image_code"] = null_where(self.image_encoder.encode(paired_images), ~present, CONCAT)
        return latents, noise, (), infer_kwargs


class TextDiffusionInferer(Inferer):
    """Training forward pass: noise the latents at ``timesteps``, concatenate ``paired_latent`` when given, and call
    :class:`TextConditionedUNet` with the tokens (the prediction is compared with the noise)."""

    def __init__(self, scheduler):
        super().__init__()
        self.scheduler = scheduler

    def __call__(self, inputs, network, noise, timesteps, tokens, keep_text=None, paired_latent=None, image_code=None):  # type: ignore[override]
        noisy = self.scheduler.add_noise(original_samples=inputs, noise=noise, timesteps=timesteps)
        if paired_latent is not None:
            noisy = torch.cat([noisy, paired_latent], dim=1)
        return network(noisy, timesteps, tokens=tokens, image_code=image_code, keep_text=keep_text)


class TextLatentSampler(Inferer):
    """Sample images from prompts (and paired images) with guidance; returns decoded ``[B, 1, H, W]`` in [0, 1].
    ``last_nfe`` holds the network calls of the last batch.

    Guidance: ``double_guidance(text_scale, pair_scale)`` over (context, concat pair) for concat pairing, where a
    batch without paired images uses ``pair_scale`` 0 (text guidance only, the pair null); otherwise classifier-free
    guidance of ``text_scale`` on the whole context (crossattn: text and image token together, as MONAI's ``cfg``).
    Scales of 1 are plain conditional sampling.

    Args:
        autoencoder: the trained ``AutoencoderKL``; image_encoder: the frozen code encoder (crossattn pairing).
        scheduler: MONAI DDPM/DDIM scheduler with the training schedule (``clip_sample=False``).
        latent_shape: ``(C, h, w)`` of the diffusion latent.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        scheduler,
        num_inference_steps: int,
        latent_shape: Sequence[int],
        scale_factor: float = 1.0,
        pairing: str = "none",
        image_encoder: nn.Module | None = None,
        text_scale: float = 3.0,
        pair_scale: float = 1.0,
        amp: bool = True,
        verbose: bool = False,
    ):
        super().__init__()
        self.autoencoder, self.scheduler, self.image_encoder = autoencoder, scheduler, image_encoder
        self.num_inference_steps, self.latent_shape = int(num_inference_steps), [int(s) for s in latent_shape]
        self.scale_factor, self.pairing = float(scale_factor), _check_pairing(pairing)
        self.text_scale, self.pair_scale = float(text_scale), float(pair_scale)
        self.amp, self.verbose = amp, verbose
        self.last_nfe = 0

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, network: nn.Module, paired_image: torch.Tensor | None = None, seeds=None):  # type: ignore[override]
        device = tokens.device
        seeds = list(seeds) if seeds is not None else list(range(tokens.shape[0]))
        network.eval()
        image_code = None
        if paired_image is not None and self.pairing == "crossattn":
            self.image_encoder.eval()
            image_code = self.image_encoder.encode(paired_image.float())
        elif paired_image is not None and self.pairing == "none":
            raise ValueError("this model was trained without pairing; it cannot take a paired image.")
        context = network.encode_context(tokens, image_code)
        if self.pairing == "concat":
            pair = (paired_latent(self.autoencoder, paired_image, self.scale_factor) if paired_image is not None
                    else torch.zeros(tokens.shape[0], *self.latent_shape, device=device))  # fmt: skip
            rule = double_guidance(
                self.text_scale, self.pair_scale if paired_image is not None else 0.0, kinds=(CONTEXT, CONCAT)
            )
            conditions = [context, pair]
        else:
            rule, conditions = classifier_free_guidance(self.text_scale, CONTEXT), [context]
        with torch.autocast(device.type, dtype=autocast_dtype(device), enabled=autocast_enabled(device, self.amp)):
            result = guided_sample(
                network,
                self.scheduler,
                rule,
                conditions,
                seeds,
                self.latent_shape[0],
                self.num_inference_steps,
                verbose=self.verbose,
                spatial_shape=self.latent_shape[1:],
            )
            decoded = self.autoencoder.decode_stage_2_outputs(result.latents / self.scale_factor)
        self.last_nfe = result.nfe
        return convert_to_tensor(decoded, track_meta=False).float().clamp(0.0, 1.0)
