r"""The paper's ImageNet table (docs/method.md §9, Table 4): ResNet-18 and MobileNetV2.

``:row=<row>[,protocol=full|smoke]`` picks a row of :data:`mpdnn.configs.imagenet.ROWS`;
the recipe is ours (the paper never published its ImageNet one) and the registry says what
it is and why. ``smoke`` runs two steps on synthetic 64×64 images, on any machine.

    python experiments/imagenet.py --list      # every row: paper, command
    python -m mpdnn.train --config experiments/imagenet.py:row=mobilenet_v2_ours_budget \
        --workdir runs/imagenet/mobilenet_v2_ours_budget --config.data.dir=<tfds data_dir> \
        --config.init.torchvision=<torchvision mobilenet_v2 state_dict .pth>

No row has been trained by mpdnn yet; ``results/perf.md`` holds the throughput measured.
"""

from mpdnn.configs.imagenet import get_config, listing

__all__ = ["get_config"]

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print every row and exit")
    if not parser.parse_args().list:
        parser.error("say --list (a row trains with: python -m mpdnn.train --config ...)")
    print(listing())
