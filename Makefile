# Two commands for a new user: `make demo` and `make test` (each creates .venv when needed).
PYTHON_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_data
DEMO_EPOCHS ?= 10

.PHONY: venv demo test lint

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -r requirements-dev.txt
	touch $@

# The demo pretrains on 112 px global crops (local crops 96..48 px) so that it runs in minutes on a laptop CPU;
# real runs use the published 224 px / 184..84 px crops.
demo: venv
	$(PY) -m datasets.demo --output_dir $(DEMO_DIR)
	$(PY) main_dino_mc.py --arch vit_tiny --patch_size 16 --data_mode mc --data_path $(DEMO_DIR)/seco \
		--output_dir $(DEMO_DIR)/pretrain --epochs $(DEMO_EPOCHS) --batch_size_per_gpu 16 --out_dim 1024 \
		--global_crops_size 112 --size_crops 96 80 64 48 --local_crops_number 4 --warmup_epochs 1 \
		--momentum_teacher 0.99 --num_workers 2 --seed 0 --print_freq 4
	$(PY) eval_knn.py --arch vit_tiny --patch_size 16 --pretrained_weights $(DEMO_DIR)/pretrain/checkpoint.pth \
		--compare_random --data_path $(DEMO_DIR)/eurosat --output_dir $(DEMO_DIR)/knn --nb_knn 5 10 20 \
		--resize_size 128 --crop_size 112 --batch_size_per_gpu 32 --num_workers 2

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q
