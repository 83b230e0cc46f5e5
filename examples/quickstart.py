"""Quickstart: distil a tiny BERT teacher into a 2-layer student, online and from a teacher cache.

    python examples/quickstart.py            # CPU, about a minute

The script is a TextBrewer script with `textbrewer` replaced by `cachebrew`, plus the cache-fed run:
the teacher's outputs are computed once, and the student trains from them with model_T=None.
It prints the accuracy of both students against the teacher's predictions and checks they are equal.
"""
import copy
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification

from cachebrew import DistillationConfig, GeneralDistiller, TrainingConfig


def bert(layers, hidden, seed):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=200, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=hidden * 4, max_position_embeddings=64, num_labels=4, output_hidden_states=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def adaptor(batch, outputs):
    return {"logits": outputs.logits, "hidden": outputs.hidden_states, "inputs_mask": batch["attention_mask"]}


def main():
    torch.manual_seed(0)
    teacher, student = bert(4, 128, seed=0).eval(), bert(2, 64, seed=1)
    ids = torch.randint(5, 200, (512, 24))
    mask = torch.ones_like(ids)
    data = [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(len(ids))]
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    distill_config = DistillationConfig(temperature=4, intermediate_matches=[
        {"layer_T": 0, "layer_S": 0, "feature": "hidden", "loss": "hidden_mse", "weight": 1, "proj": ["linear", 64, 128]},
        {"layer_T": 4, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1, "proj": ["linear", 64, 128]}])

    def distil(model_T, loader, adaptor_T):
        model_S = copy.deepcopy(student)
        torch.manual_seed(42)
        with tempfile.TemporaryDirectory() as out:
            distiller = GeneralDistiller(TrainingConfig(output_dir=out, device="cpu"), distill_config,
                                         model_T=model_T, model_S=model_S, adaptor_T=adaptor_T, adaptor_S=adaptor)
            with distiller:
                distiller.train(torch.optim.AdamW(model_S.parameters(), lr=1e-3), loader, num_epochs=3)
        return model_S.eval()

    online = distil(teacher, loader, adaptor)
    with torch.no_grad():  # the teacher runs once; this is what `cachebrew export` writes to disk
        cached = [{"student": b, "teacher_cache": adaptor(b, teacher(**b))} for b in loader]
    from_cache = distil(None, cached, None)

    with torch.no_grad():
        target = teacher(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        for name, model in (("online", online), ("from cache", from_cache)):
            agree = (model(input_ids=ids, attention_mask=mask).logits.argmax(-1) == target).float().mean()
            print(f"student distilled {name:>10}: agrees with the teacher on {agree:.1%} of inputs")
    same = all(torch.equal(a, b) for a, b in zip(online.state_dict().values(), from_cache.state_dict().values()))
    print("cache-fed student == online student:", same)
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
