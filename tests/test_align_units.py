"""Alignment data and losses, without Ray: preference pairs keep only the response learned, bad
records are named, and the losses equal their formulas computed independently."""
from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from internray.align.data import AlignDataError, prepare, split_pair, tokenize_pair
from internray.align.losses import (dpo_loss, gae, group_advantages, grpo_loss, kl_k3, masked_whiten,
                                    pairwise_reward_loss, sequence_logprobs, simpo_loss)
from internray.align.pairwise import collate_pairs
from internray.align.rewards import contains, exact, last_number
from internray.models.export import DEFAULT_CHAT_TEMPLATE
from internray.train.sft import IGNORE


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from internray.data.tokenize import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    texts = ["What is two plus two? Four. Five. And times three? Twelve. Thirteen."] * 30
    train_tokenizer(texts, vocab_size=300, min_frequency=1, out=out)
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def learned_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE])


def test_only_the_final_response_is_learned_in_both_pair_layouts(tokenizer):
    multi_turn = {"prompt": [{"role": "user", "content": "What is two plus two?"},
                             {"role": "assistant", "content": "Four."},
                             {"role": "user", "content": "And times three?"}],
                  "chosen": "Twelve.", "rejected": "Thirteen."}
    row = tokenize_pair(tokenizer, multi_turn, max_len=512)
    assert learned_text(tokenizer, row["chosen_ids"], row["chosen_labels"]) == "Twelve.<|im_end|>\n"
    assert learned_text(tokenizer, row["rejected_ids"], row["rejected_labels"]) == "Thirteen.<|im_end|>\n"
    # HH-RLHF layout: two whole conversations; what they share is the prompt
    hh = {"chosen": multi_turn["prompt"] + [{"role": "assistant", "content": "Twelve."}],
          "rejected": multi_turn["prompt"] + [{"role": "assistant", "content": "Thirteen."}]}
    assert tokenize_pair(tokenizer, hh, max_len=512) == row
    assert split_pair(hh)[0] == multi_turn["prompt"]


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "hi", "chosen": "a"}, "needs `chosen` and `rejected`"),
    ({"prompt": "hi", "chosen": "same", "rejected": "same"}, "the same response"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "`prompt` must be a string"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
     "chosen response must start with an assistant"),
])
def test_unusable_pairs_are_named(tokenizer, record, reason):
    with pytest.raises(AlignDataError, match=reason):
        tokenize_pair(tokenizer, record, max_len=512)


def test_prepare_writes_rows_and_sets_bad_lines_aside(tokenizer, tmp_path):
    source = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five."}), "{not json",
             json.dumps({"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Four."}),
             json.dumps({"prompt": "What is two plus two? " * 40, "chosen": "Four.", "rejected": "Five."})]
    source.write_text("\n".join(lines) + "\n")
    out, rejects = tmp_path / "out" / "train.parquet", tmp_path / "rejects.jsonl"
    counts = prepare(source, "dpo", tokenizer, 64, out, rejects)
    assert counts == {"records": 1, "rejected": 3}
    assert pq.read_table(out).num_rows == 1
    reasons = {r["line"]: r["reason"] for r in map(json.loads, rejects.read_text().splitlines())}
    assert set(reasons) == {2, 3, 4}
    assert "the same response" in reasons[3] and "fills max_len=64" in reasons[4]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "2+2=", "answer": 4}) + "\n" + json.dumps({"prompt": "2+2="}) + "\n")
    assert prepare(prompts, "grpo", tokenizer, 64, tmp_path / "p" / "train.parquet", tmp_path / "r.jsonl") == {
        "records": 1, "rejected": 1}
    assert pq.read_table(tmp_path / "p" / "train.parquet").column("answer").to_pylist() == ["4"]


def test_sequence_logprobs_of_a_padded_pair_batch_equal_a_token_by_token_loop(tokenizer):
    """The batched, padded, shifted computation against the plain definition: the sum over the
    response of log p(token | everything before it), one unpadded sequence at a time."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    import pyarrow as pa

    rows = [tokenize_pair(tokenizer, {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five. Twelve."}, 512),
            tokenize_pair(tokenizer, {"prompt": "And times three?", "chosen": "Twelve.", "rejected": "Thirteen."}, 512)]
    ids, labels = collate_pairs(pa.Table.from_pylist(rows), pad_id=0)
    with torch.no_grad():
        batched, lengths = sequence_logprobs(model(input_ids=ids).logits, labels)
        expected = []
        for side in ("chosen", "rejected"):
            for row in rows:
                seq, lab = row[f"{side}_ids"], row[f"{side}_labels"]
                total = 0.0
                for t in range(1, len(seq)):
                    if lab[t] != IGNORE:
                        logits = model(input_ids=torch.tensor([seq[:t]])).logits[0, -1]
                        total += float(logits.log_softmax(-1)[seq[t]])
                expected.append(total)
    assert torch.allclose(batched, torch.tensor(expected), atol=1e-4)
    assert lengths.tolist() == [sum(label != IGNORE for label in r[f"{s}_labels"]) for s in ("chosen", "rejected") for r in rows]


def test_preference_losses_equal_their_formulas():
    pc, pr, rc, rr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5]), torch.tensor([-3.5, -5.0]), torch.tensor([-3.9, -4.0])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    margins = [0.1 * ((-3.0 + 3.5) - (-4.0 + 3.9)), 0.1 * ((-5.0 + 5.0) - (-4.5 + 4.0))]
    assert loss.item() == pytest.approx(sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / 2, rel=1e-6)
    assert (chosen - rejected).tolist() == pytest.approx(margins)
    loss, chosen, rejected = simpo_loss(pc, pr, torch.tensor([3, 5]), torch.tensor([4, 3]), beta=2.0, gamma=0.5)
    simpo_margins = [2.0 * (-3 / 3 + 4 / 4) - 0.5, 2.0 * (-5 / 5 + 4.5 / 3) - 0.5]
    assert loss.item() == pytest.approx(sum(math.log1p(math.exp(-m)) for m in simpo_margins) / 2, rel=1e-6)
    assert pairwise_reward_loss(torch.tensor([2.0]), torch.tensor([0.0])).item() == pytest.approx(math.log1p(math.exp(-2)))


def test_grpo_advantages_kl_and_loss():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(rewards, group_size=4)
    assert adv[:4].tolist() == pytest.approx([0.866, -0.866, -0.866, 0.866], abs=1e-3)  # (r - mean) / sample std
    assert adv[4:].tolist() == [0.0] * 4  # a group with one reward teaches nothing
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    assert kl_k3(logp, logp).abs().max() == 0
    assert (kl_k3(logp, torch.log(torch.tensor([[0.25, 0.5]]))) > 0).all()
    # the gradient of the policy term is -A * grad(log p), averaged over the sequence's tokens
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    loss, _, kl = grpo_loss(logp, logp.detach(), mask, torch.tensor([2.0]), kl_coef=0.1)
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-1.0, -1.0, 0.0])
    assert kl.item() == 0


def test_gae_equals_the_discounted_sum_of_td_errors():
    """Row 0: a 3-token response after a 1-token prompt, then padding; row 1: a 1-token response."""
    mask = torch.tensor([[False, True, True, True, False], [False, False, True, False, False]])
    values = torch.tensor([[9.0, 0.5, 0.2, -0.1, 9.0], [9.0, 9.0, 0.3, 9.0, 9.0]])
    rewards = torch.tensor([[0.0, 0.0, 0.1, 1.0, 0.0], [0.0, 0.0, 2.0, 0.0, 0.0]])
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    d3 = 1.0 - (-0.1)  # last token: the next state is terminal
    d2 = 0.1 + gamma * -0.1 - 0.2
    d1 = 0.0 + gamma * 0.2 - 0.5
    expected = [0.0, d1 + gamma * lam * d2 + (gamma * lam) ** 2 * d3, d2 + gamma * lam * d3, d3, 0.0]
    assert advantages[0].tolist() == pytest.approx(expected)
    assert advantages[1].tolist() == pytest.approx([0.0, 0.0, 2.0 - 0.3, 0.0, 0.0])
    assert returns[0, 1:4].tolist() == pytest.approx([a + v for a, v in zip(expected[1:4], [0.5, 0.2, -0.1])])
    whitened = masked_whiten(advantages, mask)
    assert float(whitened[mask].mean()) == pytest.approx(0.0, abs=1e-6) and float(whitened[~mask].abs().max()) == 0


def test_rule_rewards():
    assert contains("the answer is 7.", "7") == 1 and contains("seven", "7") == 0
    assert exact(" Paris. ", "paris") == 1 and exact("Paris, France", "paris") == 0
    assert last_number("3 + 4 = 7", "7") == 1 and last_number("7 or 8", "7") == 0 and last_number("1,000", "1000") == 1
