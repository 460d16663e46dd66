"""Labelled inference traffic: benign, attack and malformed requests for the demo models.

One source for everything that sends example traffic (the demo, and replay as it lands), so the
same labelled requests are measured everywhere.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import random
from collections.abc import Iterator
from importlib import resources

import numpy as np

from bastion.protos import codec, pb

IMAGE_MODEL = "fashion-mnist"
TEXT_MODEL = "text-classifier"


@dataclasses.dataclass(frozen=True)
class Record:
    model: str
    label: str      # benign | attack | malformed
    family: str     # e.g. benign_image, adv_suffix, malformed:byte_count
    payload: bytes  # a serialized ModelInferRequest (or deliberately broken bytes)


def _package_file(*parts: str) -> pathlib.Path:
    return pathlib.Path(str(resources.files("bastion").joinpath(*parts)))


def load_images() -> tuple[np.ndarray, np.ndarray]:
    """Sample Fashion-MNIST test images as float32 [N,1,28,28] in [0,1], and their labels."""
    with np.load(_package_file("demo_models", IMAGE_MODEL, "samples.npz")) as data:
        images = data["images"] if "images" in data else data["images_uint8"] / np.float32(255)
        return images.astype(np.float32), data["labels"]


def load_adversarial_images() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L-inf adversarial copies of the sample images (FGSM and PGD, made by
    tools/training/build_demo_defenses.py) as float32 [N,1,28,28], true labels, attack names."""
    with np.load(_package_file("demo_models", IMAGE_MODEL, "adversarial.npz")) as data:
        return (data["images_uint8"].astype(np.float32) / np.float32(255), data["labels"],
                data["family"])


def image_records() -> list[Record]:
    """The sample images (benign) and their adversarial copies (attack, family = the attack)."""
    images, _ = load_images()
    records = [Record(IMAGE_MODEL, "benign", "benign_image",
                      image_request(image, f"img-{index}").SerializeToString())
               for index, image in enumerate(images)]
    adversarial, _, families = load_adversarial_images()
    records += [Record(IMAGE_MODEL, "attack", f"adversarial_image:{family}",
                       image_request(image, f"adv-{family}-{index}").SerializeToString())
                for index, (image, family) in enumerate(zip(adversarial, families))]
    return records


def load_text_sample(path: str | pathlib.Path | None = None) -> list[dict]:
    path = path or _package_file("data", "text_sample.jsonl")
    return [json.loads(line) for line in pathlib.Path(path).read_text("utf-8").splitlines() if line]


def image_request(image: np.ndarray, request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=IMAGE_MODEL, id=request_id)
    codec.encode_request(request, {"image": image.reshape(1, 1, 28, 28).astype(np.float32)})
    return request


def text_request(text: str, request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=TEXT_MODEL, id=request_id)
    codec.encode_request(request, {"prompt": codec.as_bytes_array([text], (1, 1))})
    return request


def malformed_requests() -> dict[str, bytes]:
    """One broken request per class of protocol error the sidecar must refuse."""
    image = image_request(np.zeros((28, 28), np.float32))
    cases: dict[str, bytes] = {}

    short = pb.ModelInferRequest(); short.CopyFrom(image)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-3]
    cases["byte_count"] = short.SerializeToString()

    negative = pb.ModelInferRequest(); negative.CopyFrom(image)
    negative.inputs[0].shape[0] = -1
    cases["negative_dim"] = negative.SerializeToString()

    both = pb.ModelInferRequest(); both.CopyFrom(image)
    both.inputs[0].contents.fp32_contents.append(0.0)
    cases["raw_and_typed"] = both.SerializeToString()

    truncated = text_request("hello")
    truncated.raw_input_contents[0] = truncated.raw_input_contents[0][:-2]
    cases["truncated_bytes"] = truncated.SerializeToString()

    unknown = pb.ModelInferRequest(); unknown.CopyFrom(image)
    unknown.inputs[0].datatype = "FP8"
    cases["unknown_datatype"] = unknown.SerializeToString()

    cases["not_protobuf"] = b"\xff\xfe\xfd not a protobuf message"
    return cases


def labelled_records(text_path: str | pathlib.Path | None = None) -> list[Record]:
    records = image_records()
    for row in load_text_sample(text_path):
        records.append(Record(TEXT_MODEL, row["label"], row["family"],
                              text_request(row["text"], row["id"]).SerializeToString()))
    for name, payload in malformed_requests().items():
        model = TEXT_MODEL if name == "truncated_bytes" else IMAGE_MODEL
        records.append(Record(model, "malformed", f"malformed:{name}", payload))
    return records


def mixed_stream(records: list[Record], seed: int = 0,
                 malformed_share: float = 0.1) -> Iterator[Record]:
    """An endless shuffled stream with roughly ``malformed_share`` malformed requests."""
    rng = random.Random(seed)
    wellformed = [r for r in records if r.label != "malformed"]
    malformed = [r for r in records if r.label == "malformed"]
    while True:
        pool = malformed if malformed and rng.random() < malformed_share else wellformed
        yield rng.choice(pool)
