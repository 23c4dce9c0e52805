# Two commands for a new user: `make demo` and `make test` (each creates .venv when needed).
PYTHON_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_data
DEMO_EPOCHS ?= 20
DEMO_SEED ?= 0
# Extra pretraining flags, e.g. make demo DEMO_FLAGS="--augment_on device"
DEMO_FLAGS ?=

.PHONY: venv demo learning_curve test lint

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -r requirements-dev.txt
	touch $@

# The demo's pretraining recipe (docs/demo.md): DINO-MC on a ViT-Tiny/16 at EuroSAT's own 64 px
# (global crops 64 px, two 32 px local crops) so that 320 steps fit in a few CPU minutes, 256 locations so that an
# epoch is 16 steps, a batch-normalised projection head and a sharper teacher (temperature 0.02) so that the small
# batch does not collapse the teacher, a higher learning rate (0.01 x 16 / 256) and a faster teacher EMA (0.99)
# for a short run. Real runs use the published 224 px / 184..84 px crops and defaults.
DEMO_LOCATIONS ?= 256
DEMO_PER_CLASS ?= 100
DEMO_DATA = $(PY) -m datasets.demo --output_dir $(DEMO_DIR) --n_locations $(DEMO_LOCATIONS) --n_per_class $(DEMO_PER_CLASS)
# k-NN evaluation size: the training crop (eval_knn.py resizes to DEMO_CROP x 256 / 224 first, as the online k-NN).
DEMO_CROP := 64

DEMO_PRETRAIN = --arch vit_tiny --patch_size 16 --batch_size_per_gpu 16 --out_dim 1024 \
	--global_crops_size $(DEMO_CROP) --size_crops 32 32 --local_crops_number 2 --epochs $(DEMO_EPOCHS) \
	--warmup_epochs 2 --lr 0.01 --momentum_teacher 0.99 --use_bn_in_head true \
	--teacher_temp 0.02 --warmup_teacher_temp 0.02 --num_workers 1 --print_freq 8

demo: venv
	$(DEMO_DATA)
	$(PY) main_dino_mc.py $(DEMO_PRETRAIN) --data_mode mc --seed $(DEMO_SEED) --data_path $(DEMO_DIR)/seco \
		--output_dir $(DEMO_DIR)/pretrain --knn_data_path $(DEMO_DIR)/eurosat --knn_every 5 $(DEMO_FLAGS)
	$(PY) eval_knn.py --arch vit_tiny --patch_size 16 --pretrained_weights $(DEMO_DIR)/pretrain/checkpoint.pth \
		--compare_random --seed $(DEMO_SEED) --data_path $(DEMO_DIR)/eurosat --output_dir $(DEMO_DIR)/knn \
		--nb_knn 5 10 20 --crop_size $(DEMO_CROP) --batch_size_per_gpu 32 --num_workers 2

# k-NN against training steps for dino / mc / tp, three seeds each, with the demo's recipe (benchmarks/README.md).
learning_curve: venv
	test -d $(DEMO_DIR)/seco || $(DEMO_DATA)
	$(PY) benchmarks/learning_curve.py --data_dir $(DEMO_DIR) --output_dir runs/learning_curve --knn_every 5 \
		-- $(DEMO_PRETRAIN)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q
