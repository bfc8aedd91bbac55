from setuptools import find_packages, setup

setup(
    name="paddle_mm",
    version="0.1.0",
    description="Vision-language models from parts on PaddlePaddle, trained and run from recipe files",
    # recipes/ stays at the top of the checkout, where users look for it, and is installed as
    # paddle_mm/recipes so `paddle-mm demo` finds it without a checkout (recipe.bundled_recipes).
    packages=find_packages(include=["paddle_mm", "paddle_mm.*"]) + ["paddle_mm.recipes"],
    package_dir={"paddle_mm.recipes": "recipes"},
    package_data={"paddle_mm.serving": ["chat.html"], "paddle_mm.recipes": ["*/*.yaml"]},
    python_requires=">=3.10",
    # Pinned versions live in requirements.txt (a set checked to install together);
    # these are the direct needs, unpinned so the package composes with other pins.
    # jinja2: checkpoint chat templates (PaddleFormers brings it too, but paddle_mm uses it directly)
    install_requires=["paddlepaddle", "paddleformers", "tokenizers", "pillow", "numpy", "pyyaml", "safetensors", "jinja2"],
    entry_points={"console_scripts": ["paddle-mm=paddle_mm.cli:main"]},
)
