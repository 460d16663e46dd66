"""The threat simulator's image mutator (``bastion replay --mutate square``): a black-box attack
whose every query is a real request to the live sidecar.

Square (Andriushchenko et al. 2020: L-inf, score-based, from IBM ART) starts from the corpus's
clean tensor records and searches within ``eps`` of each for an image the model misclassifies.
The attacker sees what a client sees: the scores of an answered output. A refused query tells it
nothing, so it counts as no progress (the attacker's loss for it is the clean answer's). It never
sends the same image twice (answers are cached by content), so the query budget is the number of
distinct images sent per clean image. Its label is the record's ``class`` when given, else the
model's answer to the clean image (an untargeted attack on the model's own decision).

An attack **got through** when the sidecar answered its final image without a detecting verdict
and the answer's class differs from the label: an evasion that also fooled the model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Sequence

import numpy as np

from bastion.replay.outcome import REFUSAL_CODES, ReplayError

NAME = "square"
FAMILY = "square_linf"

Oracle = Callable[[np.ndarray], list]  # images -> per image its scores, or None when refused


def probabilities(scores: np.ndarray) -> np.ndarray:
    """Answered scores as probabilities: kept when they already are, else softmax (logits)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.min() >= 0 and abs(scores.sum() - 1.0) < 1e-3:
        return scores
    exp = np.exp(scores - scores.max())
    return exp / exp.sum()


def classes_of(answers: list) -> np.ndarray:
    """Each answer's class, -1 where it was refused."""
    return np.array([-1 if a is None else int(np.argmax(a)) for a in answers])


def nearest(clean: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """Per query, the clean image (rows of ``clean``, flattened) it stays within eps of: the
    nearest in L-inf."""
    flat = batch.reshape(len(batch), 1, -1)
    return np.abs(flat - clean[None]).max(axis=2).argmin(axis=1)


class CachedOracle:
    """Wraps an oracle: counts the distinct images each clean image cost (and how many were
    refused), and answers repeats from memory."""

    def __init__(self, oracle: Oracle, clean: np.ndarray):
        self.oracle = oracle
        self.clean = clean.reshape(len(clean), -1)
        self.answers: dict[bytes, np.ndarray | None] = {}
        self.queries = np.zeros(len(clean), dtype=np.int64)
        self.refused = np.zeros(len(clean), dtype=np.int64)

    def __call__(self, batch: np.ndarray) -> list:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        keys = [hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in batch]
        fresh = [i for i, key in enumerate(keys) if key not in self.answers]
        fresh = list({keys[i]: i for i in fresh}.values())  # a batch may repeat an image
        if fresh:
            answers = self.oracle(batch[fresh])
            origins = nearest(self.clean, batch[fresh])
            for i, answer, origin in zip(fresh, answers, origins):
                self.answers[keys[i]] = answer
                self.queries[origin] += 1
                self.refused[origin] += answer is None
        return [self.answers[key] for key in keys]

    def classes(self, batch: np.ndarray) -> np.ndarray:
        return classes_of(self(batch))


class PaddedOracle:
    """An attacker that hides its probing among harmless queries: before each query it sends
    ``pad`` images from ``pool`` (clean images the defense answered; their answers unused), so
    the share of its requests refused stays low; a client tier with ``request_credit`` sees a
    share, not a count. No padding while the pool is empty. ``sent`` counts the padding."""

    def __init__(self, oracle: Oracle, pad: int):
        self.oracle, self.pad = oracle, pad
        self.pool = np.zeros((0,), dtype=np.float32)
        self.sent = 0

    def __call__(self, batch: np.ndarray) -> list:
        if self.pad <= 0 or not len(self.pool):
            return self.oracle(batch)
        interleaved = []
        for image in batch:
            for _ in range(self.pad):
                interleaved.append(self.pool[self.sent % len(self.pool)])
                self.sent += 1
            interleaved.append(image)
        return self.oracle(np.stack(interleaved))[self.pad::self.pad + 1]


def check_settings(eps: float, query_budget: int) -> None:
    """The attack's settings, and IBM ART, checked before any query is sent."""
    if query_budget < 3:
        raise ReplayError("square: the query budget (--query-budget) must be at least 3 (the "
                          "clean image, Square's starting point and one step)")
    if not eps > 0:
        raise ReplayError("square: eps (--eps) must be positive")
    logging.getLogger("art").setLevel(logging.WARNING)  # not its data-path notice on stderr
    try:
        import art.attacks.evasion  # noqa: F401
    except ImportError:
        raise ReplayError("bastion replay: --mutate square needs IBM ART: "
                          "pip install 'bastion-sidecar[attacks]'") from None


def square_attack(oracle: Oracle, x: np.ndarray, labels: np.ndarray, eps: float,
                  query_budget: int, seed: int = 0, clip: tuple[float, float] = (0.0, 1.0),
                  cache: bool = True, n_classes: int | None = None,
                  ) -> tuple[np.ndarray, CachedOracle | None]:
    """Square-attack copies of ``x`` (N, *shape) against ``oracle``; ``labels`` are class
    indices. With ``cache`` (the replay's attacker) a repeated image is not sent again and the
    budget is distinct images per clean image; without it every predict ART makes is a query
    (tools/image_blackbox.py keeps that for its recorded numbers). Deterministic under ``seed``
    for a deterministic oracle (numpy's global generator is restored afterwards)."""
    check_settings(eps, query_budget)
    from art.attacks.evasion import SquareAttack
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork
    x = np.ascontiguousarray(x, dtype=np.float32)
    counted = CachedOracle(oracle, x) if cache else None
    ask = counted if counted is not None else oracle
    if n_classes is None:  # learnt from the answer to a clean image
        first = ask(x[:1])[0]
        if first is None:
            raise ReplayError("square: the first clean image was refused; cannot learn "
                              "the number of classes")
        n_classes = int(np.asarray(first).size)
    flat_clean = x.reshape(len(x), -1)

    def predict(batch: np.ndarray) -> np.ndarray:
        out = np.zeros((len(batch), n_classes), dtype=np.float32)
        origins = nearest(flat_clean, batch)
        for row, answer in enumerate(ask(batch.astype(np.float32))):
            if answer is None:  # a refusal: no information, the clean answer's loss
                out[row, labels[origins[row]]] = 1.0
            else:
                out[row] = probabilities(answer)
        return out

    classifier = BlackBoxClassifierNeuralNetwork(predict, input_shape=x.shape[1:],
                                                 nb_classes=n_classes, clip_values=clip)
    state = np.random.get_state()
    np.random.seed(seed)  # Square draws its squares from numpy's global generator
    try:
        attack = SquareAttack(classifier, norm=np.inf, eps=eps, max_iter=query_budget - 2,
                              nb_restarts=1, p_init=0.3, batch_size=len(x), verbose=False)
        adversarial = attack.generate(x, y=np.eye(n_classes, dtype=np.float32)[labels])
    finally:
        np.random.set_state(state)
    return adversarial.astype(np.float32), counted


@dataclasses.dataclass
class SidecarOracle:
    """Sends images as ModelInferRequests to ``target`` (gRPC), ``concurrency`` in flight; the
    answer is ``output`` (default: the response's first output), None when refused. Any other
    failure stops the replay with the status and the sidecar's message."""
    target: str
    model: str
    input_name: str
    shape: Sequence[int]
    output: str | None = None
    timeout: float = 10.0
    client_id: str = "bastion-replay-square"
    concurrency: int = 8

    def __post_init__(self):
        import grpc

        from bastion.protos import SERVICE, pb
        self._grpc = grpc
        self._channel = grpc.insecure_channel(self.target)
        self._infer = self._channel.unary_unary(
            f"/{SERVICE}/ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString)

    def _request(self, image: np.ndarray):
        from bastion.protos import codec, pb
        request = pb.ModelInferRequest(model_name=self.model)
        codec.encode_request(request, {self.input_name: image.reshape(self.shape)},
                             {self.input_name: "FP32"})
        return request

    def __call__(self, images: np.ndarray) -> list:
        answers = []
        for start in range(0, len(images), self.concurrency):  # a client's few in flight
            answers += self._window(images[start:start + self.concurrency])
        return answers

    def _window(self, images: np.ndarray) -> list:
        from bastion.protos import codec
        calls = [self._infer.future(self._request(image), timeout=self.timeout,
                                    metadata=(("x-client-id", self.client_id),))
                 for image in images]
        answers = []
        for call in calls:
            try:
                response = call.result()
            except self._grpc.RpcError as err:
                if err.code().name in REFUSAL_CODES:
                    answers.append(None)
                    continue
                raise ReplayError(f"bastion replay: square query failed: {err.code().name}: "
                                  f"{(err.details() or '')[:200]}") from None
            outputs = codec.decode_response(response)
            if not outputs:
                raise ReplayError("bastion replay: square: the answer has no outputs")
            if self.output is not None and self.output not in outputs:
                raise ReplayError(f"bastion replay: square: no output {self.output!r} in the "
                                  f"answer (has {', '.join(outputs)})")
            answers.append(np.asarray(outputs[self.output or next(iter(outputs))]).ravel())
        return answers

    def close(self) -> None:
        self._channel.close()
