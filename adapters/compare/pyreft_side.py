"""pyreft 0.1.0's side of the comparison: train the emoji fixture's recipe, print per-epoch times
and losses as one JSON line. Runs in a throwaway venv with pyreft (see ../README.md), not in ours.

    /tmp/pyreft-venv/bin/python pyreft_side.py HF_DIR TRAIN.jsonl EPOCHS
"""

import json
import sys
import time

import pyreft
import torch
import transformers

hf_dir, data, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [json.loads(line) for line in open(data)]
torch.manual_seed(0)
tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
config = pyreft.ReftConfig(representations=[
    {"layer": layer, "component": "block_output", "low_rank_dimension": 4,
     "intervention": pyreft.LoreftIntervention(embed_dim=model.config.hidden_size, low_rank_dimension=4,
                                               dtype=torch.float32)}
    for layer in (4, 10)])
reft_model = pyreft.get_reft_model(model, config)
module = pyreft.make_multiple_position_supervised_data_module(
    tok, model, [r["prompt"] for r in rows], [r["completion"] for r in rows], positions="f2+l2",
    num_interventions=2, share_weights=True)
times: list[float] = []
losses: list[float] = []


class Clock(transformers.TrainerCallback):
    def on_epoch_begin(self, args, state, control, **kwargs):
        self.t = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        times.append(time.perf_counter() - self.t)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            losses.append(logs["loss"])


args = transformers.TrainingArguments(
    num_train_epochs=epochs, output_dir="/tmp/pyreft-side-out", per_device_train_batch_size=10, learning_rate=4e-3,
    logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
trainer = pyreft.ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, args=args, callbacks=[Clock()], **module)
trainer.train()
print(json.dumps({"impl": "pyreft", "epoch_s": times, "losses": losses}))
