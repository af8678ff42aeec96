"""Stand-in of comfy.cli_args: the parsed-argument namespace with its defaults (no argv parsing)."""
import enum
import types


class LatentPreviewMethod(enum.Enum):
    NoPreviews = "none"
    Auto = "auto"
    Latent2RGB = "latent2rgb"
    TAESD = "taesd"


args = types.SimpleNamespace(
    cpu=True, gpu_only=False, cpu_vae=False, preview_method=LatentPreviewMethod.NoPreviews, preview_size=512,
    fp8_e4m3fn_text_enc=False, fp8_e5m2_text_enc=False, fp16_text_enc=False, bf16_text_enc=False,
    fp32_text_enc=False, disable_smart_memory=False,
)
