"""Pivotal tuning: trigger-word embeddings learnt with the LoRA, bundled in its file as the webui reads them
(`bundle_emb.<token>.string_to_param.*`; SDXL `.clip_l`/`.clip_g`), and put into prompts by our generate."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lib_lora.demo.dataset import make_lora_dataset
from lib_lora.demo.tiny import random_tiny_checkpoint
from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.models.checkpoint import save_checkpoint
from lib_lora.models.conditioning import encode_chunks, token_embedding_of
from lib_lora.models.pipeline import GenerationParams, encode_prompts
from lib_lora.models.tokenizer import BOS, EOS, EmbeddingFix, get_tokenizer, tokenize_batch, tokenize_prompt
from lib_lora.networks.apply import generate_with_loras
from lib_lora.networks.embeddings import initial_embeddings
from lib_lora.networks.errors import LoraFormatError
from lib_lora.networks.files import load_lora, lora_from_state_dict, save_lora
from lib_lora.networks.network import make_network
from lib_lora.networks.targets import text_models_for
from lib_lora.train.config import ConfigError, TrainConfig
from lib_lora.train.trainer import train
from test_networks_helpers import one_thread  # noqa: F401 (fixture)

ARCHS = ["sd1", "sdxl"]


def ids(text):
    return get_tokenizer().encode(text)


# ---- tokenizer: the webui's tokenize_line with embeddings


def test_an_embedding_takes_its_vector_count_of_id0_places_and_a_fix():
    chunks = tokenize_prompt("a (zkz:1.5) star", embeddings={"zkz": 3})
    a, star = ids("a") + ids("star")
    assert chunks.tokens[0, :7].tolist() == [BOS, a, 0, 0, 0, star, EOS]
    assert chunks.weights[0, 2:5].tolist() == [1.5] * 3 and chunks.weights[0, 5] == 1.0
    assert chunks.fixes == (EmbeddingFix(0, 2, "zkz"),)
    plain = tokenize_prompt("a zkz star")
    assert plain.fixes == () and plain.tokens[0, 2 : 2 + len(ids("zkz"))].tolist() == ids("zkz")


def test_the_longest_name_wins_and_names_match_within_a_span():
    chunks = tokenize_prompt("zkz star, zkz", embeddings={"zkz": 1, "zkz star": 2})
    assert [(f.position, f.name) for f in chunks.fixes] == [(1, "zkz star"), (4, "zkz")]
    assert tokenize_prompt("(zkz) star", embeddings={"zkz star": 2}).fixes == ()  # the name spans two attention spans


def test_an_embedding_that_does_not_fit_the_chunk_starts_the_next():
    chunks = tokenize_prompt(" ".join(["cat"] * 74) + " zkz", embeddings={"zkz": 3}, comma_padding_backtrack=0)
    assert chunks.tokens.shape == (2, 77) and chunks.tokens[0, 75].item() == EOS  # 74 cats, padding
    assert chunks.fixes == (EmbeddingFix(1, 1, "zkz"),) and chunks.tokens[1, 1:4].tolist() == [0, 0, 0]
    batch = tokenize_batch(["a", " ".join(["cat"] * 74) + " zkz"], embeddings={"zkz": 3})
    assert batch.tokens.shape == (2, 2, 77) and batch.fixes == (EmbeddingFix(3, 1, "zkz"),)  # row = b·n_chunks + chunk


# ---- encoding: the vectors at the fixes, as a vocabulary grown by hand gives them


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def ckpt(request):
    return random_tiny_checkpoint(seed=2, arch=request.param)


def encoders(ckpt):
    return [ckpt.text_encoder] + ([ckpt.text_encoder_2] if ckpt.arch == "sdxl" else [])


def learnt(ckpt, n=2, seed=0):
    """Vectors as if trained: the init word's, moved well away."""
    g = torch.Generator().manual_seed(seed)
    (start,) = initial_embeddings(encoders(ckpt), ["zkz"], "star", n)
    return {"zkz": tuple(v + torch.randn(v.shape, generator=g) for v in start.vectors)}


def grown_vocabulary(ckpt, vectors):
    """A copy whose token embeddings have the vectors as new rows 49408...: the by-hand way of a new token."""
    grown = copy.deepcopy(ckpt)
    for encoder, vec in zip(encoders(grown), vectors):
        layer = token_embedding_of(encoder)
        layer.weight = nn.Parameter(torch.cat([layer.weight.detach(), vec.detach()]))
        layer.num_embeddings = layer.weight.shape[0]
    return grown


def test_encoding_puts_the_vectors_where_the_token_was(ckpt):
    vectors = learnt(ckpt)
    prompt = "a zkz star, (zkz:1.2) on the left"
    cond = encode_prompts(ckpt, [prompt], embeddings=vectors)
    chunks = tokenize_batch([prompt], embeddings={"zkz": 2})
    tokens = chunks.tokens.clone()
    rows = tokens.view(-1, 77)
    for fix in chunks.fixes:
        rows[fix.row, fix.position : fix.position + 2] = torch.tensor([49408, 49409])
    by_hand = encode_chunks(grown_vocabulary(ckpt, vectors["zkz"]), tokens, chunks.weights)
    torch.testing.assert_close(cond.context, by_hand.context, rtol=0, atol=1e-6)  # (bigG's pooled argmax needs ids below EOS)
    assert not torch.allclose(cond.context, encode_prompts(ckpt, [prompt]).context)


def test_gradients_reach_the_vectors(ckpt):
    vectors = {"zkz": tuple(v.requires_grad_() for v in learnt(ckpt)["zkz"])}
    encode_prompts(ckpt, ["a zkz star"], embeddings=vectors).context.square().sum().backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in vectors["zkz"])


# ---- the file: keys per architecture, round trip, the webui's reading


def network_with_embedding(ckpt, vectors):
    text_models = text_models_for(ckpt.arch, ckpt.text_encoder, ckpt.text_encoder_2)
    (start,) = initial_embeddings(encoders(ckpt), ["zkz"], "star", 2)
    network = make_network(ckpt.unet, text_models, network_dim=4, embeddings=[start])
    with torch.no_grad():
        for param, vec in zip(network.embedding_vectors()["zkz"], vectors["zkz"]):
            param.copy_(vec)
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.add_(0.05)
    return network


def test_the_init_word_starts_each_vector_as_the_webui_does(ckpt):
    star = ids("red star")  # two tokens; three vectors take tokens 0, 0, 1 (i·k//n)
    (embedding,) = initial_embeddings(encoders(ckpt), ["zkz"], "red star", 3)
    for encoder, vec in zip(encoders(ckpt), embedding.vectors):
        weight = token_embedding_of(encoder).weight
        assert torch.equal(vec, weight[[star[0], star[0], star[1]]])
    (one,) = initial_embeddings(encoders(ckpt), ["zkz"], "red star", 1)
    assert torch.equal(one.vectors[0], token_embedding_of(ckpt.text_encoder).weight[star[:1]])


def test_bundle_keys_round_trip_and_resume(ckpt, tmp_path):
    vectors = learnt(ckpt)
    network = network_with_embedding(ckpt, vectors)
    path = save_lora(tmp_path / "t.safetensors", network.state_dict(), {}, save_dtype=torch.float32)
    tensors = load_file(path)
    width = ckpt.text_encoder.config.width
    bundle = {k: tuple(v.shape) for k, v in tensors.items() if k.startswith("bundle_emb.")}
    if ckpt.arch != "sdxl":
        assert bundle == {"bundle_emb.zkz.string_to_param.*": (2, width)}
    else:
        assert bundle == {"bundle_emb.zkz.clip_l": (2, width), "bundle_emb.zkz.clip_g": (2, ckpt.text_encoder_2.config.width)}
    lora = load_lora(path)
    assert list(lora.embeddings) == ["zkz"] and all(torch.equal(a, b) for a, b in zip(lora.embeddings["zkz"].vectors, vectors["zkz"]))
    assert len(lora.modules) == len(network.module_names())
    resumed = network_with_embedding(ckpt, learnt(ckpt, seed=9))
    resumed.load_state_dict(tensors)
    assert all(torch.equal(a, b) for a, b in zip(resumed.embedding_vectors()["zkz"], vectors["zkz"]))
    half = load_lora(save_lora(tmp_path / "h.safetensors", network.state_dict(), {}, save_dtype=torch.float16))
    assert all(torch.allclose(a.float(), b, rtol=1e-3, atol=1e-3) for a, b in zip(half.embeddings["zkz"].vectors, vectors["zkz"]))


def webui_bundles(tensors: dict) -> tuple[dict, set]:
    """The webui 1.10 `networks.load_network` split (paraphrased): key at its first dot; `bundle_emb` keys go to
    embeddings by the next dot, `string_to_param.<k>` into a dict; then `create_embedding_from_data`'s cases
    give (vectors, shape). Returns the embeddings and the module names the other keys ask for."""
    bundles, modules = {}, set()
    for key, weight in tensors.items():
        base, _, part = key.partition(".")
        if base == "bundle_emb":
            emb_name, vec_name = part.split(".", 1)
            data = bundles.setdefault(emb_name, {})
            if vec_name.split(".")[0] == "string_to_param":
                data["string_to_param"] = {vec_name.split(".", 1)[1]: weight}
            else:
                data[vec_name] = weight
        else:
            modules.add(base)
    embeddings = {}
    for name, data in bundles.items():
        if "string_to_param" in data:
            (vec,) = data["string_to_param"].values()
            embeddings[name] = (vec, vec.shape[-1])
        elif "clip_g" in data and "clip_l" in data:
            embeddings[name] = ({k: data[k] for k in ("clip_l", "clip_g")}, data["clip_g"].shape[-1] + data["clip_l"].shape[-1])
    return embeddings, modules


def test_the_webui_reads_the_bundle_as_an_embedding_of_the_models_width(ckpt, tmp_path):
    vectors = learnt(ckpt)
    network = network_with_embedding(ckpt, vectors)
    tensors = load_file(save_lora(tmp_path / "t.safetensors", network.state_dict(), {}, save_dtype=torch.float32))
    embeddings, modules = webui_bundles(tensors)
    assert modules == set(network.module_names())  # bundle keys ask for no layer: the webui skips them there
    vec, shape = embeddings["zkz"]
    widths = [e.config.width for e in encoders(ckpt)]
    assert shape == sum(widths)  # the webui's expected_shape: 768 SD1, 1024 SD2, 768 + 1280 SDXL
    if ckpt.arch != "sdxl":
        assert torch.equal(vec, vectors["zkz"][0])
    else:
        assert torch.equal(vec["clip_l"], vectors["zkz"][0]) and torch.equal(vec["clip_g"], vectors["zkz"][1])


@pytest.mark.parametrize("keys, message", [
    ({"bundle_emb.zkz.t5": (2, 8)}, "bundle_emb.zkz.t5: bundled embedding 'zkz' has vectors"),
    ({"bundle_emb.zkz.clip_l": (2, 8)}, "reads string_to_param.* alone or clip_l with clip_g"),
    ({"bundle_emb.zkz.clip_l": (2, 8), "bundle_emb.zkz.clip_g": (3, 4)}, "different numbers of vectors"),
    ({"bundle_emb.zkz.string_to_param.*": (8,)}, r"is \[n_vectors, width\]"),
    ({"bundle_emb.zkz": (2, 8)}, "not a bundled embedding key"),
])
def test_a_malformed_bundle_is_refused_naming_its_key(keys, message):
    with pytest.raises(LoraFormatError, match=message):
        lora_from_state_dict({k: torch.zeros(shape) for k, shape in keys.items()})


# ---- generate: `<lora:name:1>` brings its trigger's vectors


@pytest.fixture(scope="module")
def lora_folders(ckpt, tmp_path_factory):
    """The same LoRA twice: with its bundled embedding, and with the bundle keys removed."""
    root = tmp_path_factory.mktemp(f"loras-{ckpt.arch}")
    vectors = learnt(ckpt)
    path = save_lora(root / "with" / "t.safetensors", network_with_embedding(ckpt, vectors).state_dict(), {"ss_output_name": "t"},
                     save_dtype=torch.float32)
    (root / "without").mkdir()
    tensors = {k: v for k, v in load_file(path).items() if not k.startswith("bundle_emb.")}
    save_file(tensors, str(root / "without" / "t.safetensors"))
    return root / "with", root / "without", vectors


def test_generate_uses_the_bundled_vectors(ckpt, lora_folders):
    with_bundle, without, vectors = lora_folders
    params = GenerationParams(prompt="a zkz star <lora:t:1>", steps=2, width=64, height=64, seed=3)
    bundled = generate_with_loras(ckpt, params, [with_bundle])[0]
    plain = generate_with_loras(ckpt, params, [without])[0]
    by_hand = generate_with_loras(ckpt, params, [without], embeddings=vectors)[0]
    assert bundled.tobytes() != plain.tobytes()
    assert bundled.tobytes() == by_hand.tobytes()
    no_trigger = GenerationParams(prompt="a star <lora:t:1>", steps=2, width=64, height=64, seed=3)
    assert generate_with_loras(ckpt, no_trigger, [with_bundle])[0].tobytes() == generate_with_loras(ckpt, no_trigger, [without])[0].tobytes()


def test_a_bundle_of_another_width_is_refused(ckpt, tmp_path):
    other = "sd1" if ckpt.arch == "sdxl" else "sdxl"
    foreign = random_tiny_checkpoint(seed=2, arch=other)
    tensors = {k: v for k, v in network_with_embedding(foreign, learnt(foreign)).state_dict().items() if k.startswith("bundle_emb.")}
    save_lora(tmp_path / "e.safetensors", tensors, {}, save_dtype=torch.float32)
    with pytest.raises(LoraFormatError, match="bundled embedding 'zkz' has widths"):
        generate_with_loras(ckpt, GenerationParams(prompt="zkz <lora:e:1>", steps=1, width=64, height=64), [tmp_path])


# ---- training


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_lora_dataset(tmp_path_factory.mktemp("data"), concept="star", trigger="zkz", n_images=2, repeats=1, seed=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_pivotal_training_learns_the_trigger_and_bundles_it(arch, dataset, tmp_path):
    """UNet-only LoRA + the trigger's embedding (so the text encoder is frozen, yet its outputs are not cached)."""
    path = tmp_path / "base.safetensors"
    save_checkpoint(random_tiny_checkpoint(1, arch), path)
    host = StandaloneHost.from_file(path, out_dir=tmp_path, device="cpu")
    config = TrainConfig(train_data_dir=str(dataset), resolution=(64, 64), train_batch_size=2, max_train_epochs=3, learning_rate=1e-3,
                         network_dim=4, output_name="p", trigger_words="zkz", pivotal_tuning=True, embedding_lr=1e-2,
                         init_word="star", num_vectors_per_token=2, network_train_unet_only=True, seed=3,
                         sample_prompts=("a zkz star --s 1",), sample_every_n_steps=3)
    result = train(config, host)
    lora = load_lora(result.final_path)
    (start,) = initial_embeddings([m.module for m in host.text_encoders], ["zkz"], "star", 2)
    trained = lora.embeddings["zkz"].vectors
    assert len(trained) == len(start.vectors) and all(t.shape == s.shape for t, s in zip(trained, start.vectors))
    assert all(not torch.allclose(t.float(), s, atol=1e-3) for t, s in zip(trained, start.vectors))  # learnt at embedding_lr
    assert lora.modules and all(name.startswith("lora_unet_") for name in lora.modules)
    assert list((result.run_dir / "samples").glob("*.png"))  # samples rendered with the live vectors


def test_pivotal_options_are_checked(tmp_path, tiny_checkpoint_path, dataset):
    with pytest.raises(ConfigError, match="set trigger_words"):
        TrainConfig(pivotal_tuning=True)
    with pytest.raises(ConfigError, match="has a dot"):
        TrainConfig(pivotal_tuning=True, trigger_words="zkz, my.char")
    with pytest.raises(ConfigError, match="num_vectors_per_token"):
        TrainConfig(pivotal_tuning=True, trigger_words="zkz", num_vectors_per_token=76)

    class NoEmbeddings(StandaloneHost):
        trains_embeddings = False

    host = NoEmbeddings.from_file(tiny_checkpoint_path, out_dir=tmp_path, device="cpu")
    config = TrainConfig(train_data_dir=str(dataset), resolution=(64, 64), max_train_steps=1, output_name="w", trigger_words="zkz",
                         pivotal_tuning=True)
    with pytest.raises(ConfigError, match="pivotal_tuning: this host cannot"):
        train(config, host)
    assert not (tmp_path / "runs" / "w").exists()  # refused before the run folder is made
