#!/usr/bin/env bash
# Install Fashion-MNIST from Debian's dataset-fashion-mnist package (IDX files under
# /usr/share/datasets/fashion-mnist), unless it is already there. Needs root or sudo and apt.
set -euo pipefail
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ] || [ -f "$DIR/train-images-idx3-ubyte" ]; then
    echo "Fashion-MNIST is already installed in $DIR"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq dataset-fashion-mnist
echo "Fashion-MNIST installed in $DIR"
