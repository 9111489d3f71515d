"""Chinese prompt templates for zero-shot classification, written for this project.

Each template holds one "{}" that the class label replaces. `ChineseCLIP.zero_shot` embeds
every label in every template, L2-normalizes, averages per label and normalizes again (the
prompt ensembling of CLIP).
"""

CHINESE_TEMPLATES: tuple[str, ...] = (
    "{}",
    "{}的照片。",
    "一张{}的照片。",
    "一张{}的图片。",
    "这是一张{}的照片。",
    "一张清晰的{}的照片。",
    "一张模糊的{}的照片。",
    "一张{}的特写照片。",
    "一张小的{}的照片。",
    "一张大的{}的照片。",
    "一幅{}的画。",
    "{}的黑白照片。",
    "一张好看的{}的照片。",
    "一张{}的裁剪照片。",
    "一张光线很暗的{}的照片。",
    "一张{}的卡通图。",
)


def fill(template: str, label: str) -> str:
    """template with its "{}" replaced by label (labels may contain braces)."""
    if template.count("{}") != 1:
        raise ValueError(f"a template needs exactly one '{{}}' placeholder, got {template!r}")
    return template.replace("{}", label)
