"""segjax: semantic segmentation in JAX/Flax."""
import setuptools

setuptools.setup(
    name='segjax',
    version='0.1.0',
    description='Semantic image segmentation research code in JAX/Flax.',
    packages=setuptools.find_packages(include=['segjax', 'segjax.*']),
    # jax 0.10, flax 0.12 and orbax-checkpoint 0.12 need Python 3.11 or newer.
    python_requires='>=3.11',
    # Ranges tested together on CPU (README, "Tested versions"): the newest JAX of each Python,
    # 0.10 on 3.11 (JAX 0.11+ and flax 0.12.9+ need 3.12), 0.12 with flax 0.12.12 on 3.12+.
    install_requires=[
        'jax>=0.10.0,<0.11; python_version < "3.12"',
        'jax>=0.12.0,<0.13; python_version >= "3.12"',
        'flax>=0.12.0,<0.13; python_version < "3.12"',
        'flax>=0.12.12,<0.13; python_version >= "3.12"',
        'optax>=0.2.5,<0.3',
        'orbax-checkpoint>=0.12.0,<0.13',
        'tensorflow-datasets>=4.9.9,<4.10',
        'grain>=0.2.12,<0.3',
        'ml_collections>=1.1.0,<2',
        'absl-py>=2.1,<3',
        'numpy>=2.0,<3',
        'Pillow>=10.0,<14',
        'importlib_resources>=6.0',
        'tensorboardX>=2.6,<3',
        'tqdm>=4.66,<5',
        'safetensors>=0.4,<1',  # reading .safetensors backbone weights (numpy API)
        'scipy>=1.11,<2',  # reading SBD's .mat labels
        'matplotlib>=3.8,<4',  # the confusion-matrix plot of evaluation reports
        'tifffile>=2023.1,<2028',  # multi-channel TIFF images in folder datasets
        'pycocotools>=2.0.8,<2.1',  # COCO's polygons and RLE -> masks (dataset coco_voc)
        'flatbuffers>=24.3,<26',  # jax.export's serializer (--mode export's model.stablehlo)
    ],
    extras_require={
        # PyTorch reads .pth weights; it, mmsegmentation's model code (on mmcv-lite, no
        # compiled ops; ftfy and regex for its tokenizer import) and Hugging Face
        # transformers' are the references of the weight-parity tests (tests/references.py).
        # This exact torch is a small CPU build where CI runs, on Python 3.11 only (a range,
        # or Python 3.12+, would pull a multi-GB CUDA one): on 3.12+ those tests skip.
        # torchvision 0.28.0 is installed with --no-deps (README): its declared torch pin
        # would pull the CUDA build.
        # ONNX export is checked with onnxruntime (jax2onnx itself: --no-deps, README).
        'test': ['pytest>=8,<10', 'pytest-xdist>=3.6,<4', 'hypothesis>=6.100,<7', 'onnx>=1.20.1,<2',
                 'onnx-ir>=0.2.1,<2', 'onnxruntime>=1.24.1,<2'] + [
            f'{requirement}; python_version < "3.12"' for requirement in (
                'torch==2.13.0', 'mmcv-lite==2.1.0', 'mmengine>=0.10.4,<0.11',
                'mmsegmentation==1.2.2',
                'mmpretrain==1.2.0',  # the ConvNeXt of mmseg's UPerNet configs
                'ftfy>=6.1,<7', 'regex>=2023.1', 'transformers>=5.25,<6')],
    },
)
