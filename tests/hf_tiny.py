"""Tiny random models of every supported family (hidden 64, 2 layers, vocab 128), built from configs."""
import torch

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=128)


def tiny_config(family: str, **overrides):
    import transformers as tf

    if family == "llama":
        cfg = tf.LlamaConfig(**_COMMON, num_key_value_heads=2)
    elif family == "mistral":
        cfg = tf.MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=64)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**_COMMON, num_key_value_heads=2)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=16)
    elif family == "gemma":
        cfg = tf.GemmaConfig(**_COMMON, num_key_value_heads=2, head_dim=16)
    elif family == "gemma2":
        cfg = tf.Gemma2Config(**_COMMON, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                              sliding_window=64, attn_logit_softcapping=None, final_logit_softcapping=30.0)
    elif family == "gemma3_text":
        cfg = tf.Gemma3TextConfig(**_COMMON, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                  sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    elif family == "phi3":
        cfg = tf.Phi3Config(**_COMMON, num_key_value_heads=2, pad_token_id=0)
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                            attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, scale_attn_by_inverse_layer_idx=True)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(**_COMMON, rotary_pct=0.5, attention_dropout=0.0, hidden_dropout=0.0)
    elif family == "opt":
        cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64,
                           dropout=0.0, attention_dropout=0.0, pad_token_id=1)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2",
            "gpt_neox", "opt"]


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A random tiny model in eval mode; the same seed gives the same weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    attn = "eager" if family == "gemma2" else "sdpa"    # transformers gives Gemma2 no SDPA path
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), attn_implementation=attn,
                                             dtype=dtype)
    return model.eval()


def padded_batch(batch=3, seq=7, seed=1):
    """input_ids, attention_mask, labels: row 0 left-padded, row 1 right-padded, the rest full."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :2] = 0
    if batch > 1:
        mask[1, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


# -- encoder-decoder models -------------------------------------------------------------------

SEQ2SEQ_FAMILIES = ["bart", "mbart", "pegasus", "marian", "blenderbot", "blenderbot-small", "plbart"]
_SEQ2SEQ_CONFIGS = {"bart": "BartConfig", "mbart": "MBartConfig", "pegasus": "PegasusConfig",
                    "marian": "MarianConfig", "blenderbot": "BlenderbotConfig",
                    "blenderbot-small": "BlenderbotSmallConfig", "plbart": "PLBartConfig", "t5": "T5Config"}


def tiny_seq2seq_config(family: str, encoder_layers: int = 2, decoder_layers: int = 2, **overrides):
    import transformers as tf

    cls = getattr(tf, _SEQ2SEQ_CONFIGS[family])
    if family == "t5":
        cfg = cls(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=encoder_layers,
                  num_decoder_layers=decoder_layers, num_heads=4, dropout_rate=0.0, decoder_start_token_id=0)
    else:
        # pad 1, eos 2, decoder start 2 (BART's); no forced tokens, no dropout
        cfg = cls(vocab_size=VOCAB, d_model=64, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                  max_position_embeddings=128, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                  pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                  forced_bos_token_id=None, forced_eos_token_id=None)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_seq2seq(family: str = "bart", seed: int = 0, dtype=torch.float32, **overrides):
    """A random tiny encoder-decoder LM in eval mode; the same seed gives the same weights."""
    from transformers import AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    model = AutoModelForSeq2SeqLM.from_config(tiny_seq2seq_config(family, **overrides), attn_implementation="sdpa",
                                              dtype=dtype)
    return model.eval()


def seq2seq_batch(batch=3, src=7, tgt=5, seed=1):
    """input_ids, attention_mask, decoder_input_ids, labels: source row 0 left-padded, row 1
    right-padded; targets unpadded (labels are decoder_input_ids shifted left)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, src), generator=g)
    mask = torch.ones(batch, src, dtype=torch.long)
    mask[0, :2] = 0
    if batch > 1:
        mask[1, -3:] = 0
    ids = ids.masked_fill(mask == 0, 1)
    target = torch.randint(3, VOCAB, (batch, tgt + 1), generator=g)
    target[:, 0] = 2
    return ids, mask, target[:, :-1].contiguous(), target[:, 1:].contiguous()


def peft_greedy(family: str, prefix: torch.Tensor, ids: list, new: int) -> list:
    """Greedy tokens of PEFT's prefix-tuning forward over the growing sequence (no cache), for
    the tiny `family` model with `prefix` [L, 2, Hkv, P, D] as its prompt encoder."""
    from peft import PrefixTuningConfig, get_peft_model

    from prefix_kernels.bank import bank_to_peft_flat

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix.shape[3])
    model = get_peft_model(tiny_model(family), config)
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(bank_to_peft_flat(prefix))
        seq = torch.tensor([ids])
        for _ in range(new):
            logits = model(input_ids=seq, position_ids=torch.arange(seq.shape[1])[None]).logits
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], 1)
    return seq[0, len(ids):].tolist()



def save_tiny_bart(folder, words, max_positions=64, init_std=0.02):
    """A tiny BART and a word-level tokenizer over `words` (bos 0, pad 1, eos 2: BART's ids, so
    words must start with <s>, <pad>, </s>, <unk>), saved to a folder (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast

    assert list(words[:4]) == ["<s>", "<pad>", "</s>", "<unk>"], words[:4]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    config = BartConfig(vocab_size=len(words), d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=max_positions, dropout=0.0, attention_dropout=0.0,
                        activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                        decoder_start_token_id=2, forced_eos_token_id=None, init_std=init_std)
    BartForConditionalGeneration(config).save_pretrained(folder)
    return str(folder)
