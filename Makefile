# Two commands on a fresh machine: `make demo` runs style transfer on embedded sample images, `make test` the tests.
# Both create .venv on first use. TORCH is what `pip install` is given for torch and torchvision: by default the CPU
# build from PyTorch's CPU index where no NVIDIA GPU is found (nvidia-smi), falling back to PyPI's torch where that
# index cannot be reached, and PyPI's default (a CUDA build on Linux) where a GPU is found. `make TORCH="..."` chooses
# yourself, e.g. TORCH="torch==2.14.1 torchvision==0.29.1" (what CI installs); or install the package into your own
# environment with `pip install -e ".[dev]"`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CPU_INDEX := https://download.pytorch.org/whl/cpu
NVIDIA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(origin TORCH),undefined)
ifeq ($(NVIDIA),yes)
TORCH := torch torchvision
TORCH_CHOICE := PyPI's default build (an NVIDIA GPU was found)
else
TORCH := torch torchvision --index-url $(CPU_INDEX) --timeout 15 --retries 1
TORCH_CHOICE := the CPU build (no NVIDIA GPU was found)
TORCH_FALLBACK := torch torchvision
endif
else
TORCH_CHOICE := TORCH as given
endif

.PHONY: demo test lint report-samples

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_FALLBACK)" ] && ! $(PY) -c "import urllib.request as u; u.urlopen('$(CPU_INDEX)/', timeout=10)" \
		2>/dev/null; then \
		echo "make: $(CPU_INDEX) cannot be reached; installing PyPI's torch: pip install $(TORCH_FALLBACK)"; \
		$(PY) -m pip install -q $(TORCH_FALLBACK); \
	else \
		echo "make: installing torch, $(TORCH_CHOICE): pip install $(TORCH)"; \
		$(PY) -m pip install -q $(TORCH); \
	fi
	@$(PY) -c "import torchvision" 2>/dev/null || { test -n "$(TORCH_FALLBACK)" && \
		echo "make: that torchvision does not import beside that torch; installing PyPI's: pip install $(TORCH_FALLBACK)" && \
		$(PY) -m pip install -q --upgrade $(TORCH_FALLBACK); }
	@$(PY) -c "import torch, torchvision; print(f'make: installed torch {torch.__version__}, a', \
		f'CUDA {torch.version.cuda}' if torch.version.cuda else 'CPU-only', 'build')"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lightning-nst fit -c configs/style_transfer_gram.yaml -c configs/cpu.yaml

# LIGHTNING_NST_HIDE_SHARED=1 make test: the suite as on a fresh machine, without ../shared (-rs names what skipped).
test: $(STAMP)
	$(PY) -m pytest -rs

lint: $(STAMP)
	$(VENV)/bin/ruff check lightning_nst tests && $(VENV)/bin/ruff format --check lightning_nst tests

# The CPU report samples under docs/reports: the partial ImageNet VGG19 weights of ../shared (random weights beyond
# relu3_1, labelled as such), the tests' tiny random Stable Diffusion pipeline, scikit-image's full-size images
# (installed with .[dev]; the reports' defaults are the smaller shipped samples) and Starry Night from ../shared as
# one of gram_vs_meanvar's textures and the style of the diffusion reports and of style_controls.
SAMPLE_WEIGHTS ?= ../shared/models/vgg19_imagenet_conv1_1-conv3_1.pth
SAMPLE_STYLE ?= ../shared/data/style/starry_night.jpg
TEXTURES := skimage:gravel, skimage:brick, skimage:grass, skimage:immunohistochemistry, skimage:coffee
IMAGES := --content skimage:astronaut --texture skimage:gravel --textures "[$(TEXTURES)]" \
	--style skimage:immunohistochemistry
SAMPLES := --config configs/report_cpu.yaml --model reports/tiny-sd --progress_bar false $(IMAGES)
STARRY := --style_prompt "in the style of Van Gogh's The Starry Night, swirling brushstrokes"

reports/tiny-sd: | $(STAMP)
	$(PY) -m lightning_nst.diffusion.tiny --tokenizer ../shared/models/clip-tokenizer $@

report-samples: $(STAMP) reports/tiny-sd
	export LIGHTNING_NST_VGG_WEIGHTS=$(SAMPLE_WEIGHTS) && \
	for experiment in reconstruction texture_layers; do \
		$(VENV)/bin/lightning-nst report $$experiment $(SAMPLES) --out docs/reports/$$experiment || exit 1; \
	done && \
	$(VENV)/bin/lightning-nst report gram_vs_meanvar $(SAMPLES) --textures "[$(SAMPLE_STYLE), $(TEXTURES)]" \
		--out docs/reports/gram_vs_meanvar && \
	for experiment in guided_vs_nst guided_vs_prompt; do \
		$(VENV)/bin/lightning-nst report $$experiment $(SAMPLES) --style $(SAMPLE_STYLE) $(STARRY) \
			--out docs/reports/$$experiment || exit 1; \
	done && \
	$(VENV)/bin/lightning-nst report guided_img2img_vs_nst $(SAMPLES) --style $(SAMPLE_STYLE) --image_size 64 \
		--out docs/reports/guided_img2img_vs_nst && \
	$(VENV)/bin/lightning-nst report style_controls $(SAMPLES) --style $(SAMPLE_STYLE) --second_style skimage:gravel \
		--out docs/reports/style_controls
