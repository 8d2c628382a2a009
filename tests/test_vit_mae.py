"""The ViT encoder (torchvision's VisionTransformer, its names, its feature) and MAE: the loss
against lightly's MAE pieces, training, the decoder's federated split, the "auto" encoder."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models.vision_transformer import VisionTransformer

from fedssl.common.config import ConfigError, RunConfig
from fedssl.common.encoders import build_encoder, describe_encoder, torchvision_recipe
from fedssl.common.evaluation import collapse_std
from fedssl.common.methods import METHODS, build_method
from fedssl.common.methods.mae import MAE, patchify, random_masking, reconstruction_loss
from fedssl.common.training import StepSettings, augmenter, train_epochs
from fedssl.common.vit import encode_visible
from fedssl.server.run_dir import encoder_config, weights_metadata


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are small: one thread, as fast_config's runs, and no stalls when the
    machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mae(**changes) -> MAE:
    return build_method(RunConfig(method="mae", image_size=16, **changes))


# --- the encoder ---------------------------------------------------------------------------


def test_vit_tiny_is_torchvisions_vit_and_its_export_loads_into_plain_torchvision(tmp_path):
    encoder, dim = build_encoder("vit_tiny", 32)
    about = describe_encoder("vit_tiny", 32)
    assert isinstance(encoder, VisionTransformer) and dim == about["num_features"] == 192
    assert about["vit"] == {"image_size": 32, "patch_size": 4, "num_layers": 12, "num_heads": 3,
                            "hidden_dim": 192, "mlp_dim": 768}
    images = torch.randn(3, 3, 32, 32)
    encoder.eval()
    with torch.no_grad():
        feature = encoder(images)
    assert feature.shape == (3, 192)

    # what an export holds, read back by the model card's recipe, run as written
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(about))
    scope: dict = {}
    exec(torchvision_recipe("vit_tiny", 32, str(tmp_path)), scope)
    plain = scope["net"]
    assert type(plain) is VisionTransformer and not any(k.startswith("heads.") for k in plain.state_dict())
    with torch.no_grad():
        assert torch.allclose(plain(images), feature, atol=1e-4)  # channels_last vs not: rounding


def test_encoding_every_patch_is_torchvisions_forward_class_token():
    encoder, _ = build_encoder("vit_tiny", 16)
    images = torch.randn(2, 3, 16, 16)
    every = torch.arange(16).repeat(2, 1)
    with torch.no_grad():
        assert torch.allclose(encode_visible(encoder.eval(), images, every)[:, 0], encoder(images), atol=1e-5)


def test_vit_positions_are_fixed_sine_cosine_and_a_bad_size_is_one_line():
    encoder, _ = build_encoder("vit_tiny", 32)
    pos = encoder.encoder.pos_embedding
    assert not pos.requires_grad and torch.equal(pos[0, 0], torch.zeros(192))
    assert pos[0, 1:].abs().max() <= 1.0 and len({tuple(r.tolist()) for r in pos[0, 1:]}) == 64
    with pytest.raises(ValueError, match=r"^image-size=30 is invalid for encoder='vit_tiny': must be a multiple"):
        build_encoder("vit_tiny", 30)


def test_another_method_trains_the_vit_and_collapse_reads_its_feature():
    method = build_method(RunConfig(method="byol", encoder="vit_tiny", image_size=16, proj_dim=16,
                                    hidden_dim=32))
    loss = method(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    loss.backward()
    assert torch.isfinite(loss) and method.encoder.conv_proj.weight.grad.abs().sum() > 0
    # MAE has no projector: the server's collapse monitor reads the ViT's 192 values
    m = mae().eval()
    with torch.no_grad():
        projections = m.projector(m.encoder(torch.randn(32, 3, 16, 16)))
    assert projections.shape == (32, 192) and 0.0 < collapse_std(projections) < 1.0


# --- the loss against the reference ----------------------------------------------------------


def test_patchify_and_masking_are_lightlys():
    lightly_utils = pytest.importorskip("lightly.models.utils")
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(patchify(images, 4), lightly_utils.patchify(images, 4))
    keep, masked = random_masking(5, 64, 0.75)
    assert keep.shape == (5, 16) and masked.shape == (5, 48)
    assert all(sorted(torch.cat([k, m]).tolist()) == list(range(64)) for k, m in zip(keep, masked))
    assert len({tuple(sorted(k.tolist())) for k in keep}) == 5  # a different subset per sample


@pytest.mark.parametrize("ratio, kept", [(1e-17, 63), (0.999, 1), (0.75, 16)])
def test_masking_always_hides_one_patch_and_shows_one(ratio, kept):
    keep, masked = random_masking(2, 64, ratio)
    assert keep.shape == (2, kept) and masked.shape == (2, 64 - kept)


@pytest.mark.parametrize("share", [True, False])
def test_mae_loss_matches_lightlys_mae_on_the_same_inputs(share):
    """lightly's torchvision MAE pieces (MaskedVisionTransformerTorchvision, MAEDecoder,
    random_token_mask, patchify, get_at_index, as lightly's MAE example wires them) with the
    same weights and masks; the target normalised per patch as MAE's models_mae.py does."""
    pytest.importorskip("lightly")
    from lightly.models import utils
    from lightly.models.modules.masked_autoencoder import MAEDecoder
    from lightly.models.modules.masked_vision_transformer_torchvision import MaskedVisionTransformerTorchvision

    torch.manual_seed(0)
    method = mae(mae_share_decoder=share, mae_decoder_dim=64, mae_decoder_depth=2)
    images = torch.randn(6, 3, 16, 16)
    idx_keep, idx_mask = utils.random_token_mask((6, 17), mask_ratio=0.75)  # 16 patches + class

    backbone = MaskedVisionTransformerTorchvision(method.encoder, weight_initialization="skip",
                                                  pos_embed_initialization="skip")
    decoder = MAEDecoder(seq_length=17, num_layers=2, num_heads=2, embed_input_dim=192, hidden_dim=64,
                         mlp_dim=256, out_dim=48)
    ours = method.decoder.state_dict()
    renamed = {"decoder_embed.": "embed.", "prediction_head.": "predict.", "": "blocks."}
    decoder.load_state_dict({k: ours[next(o + k[len(r):] for r, o in renamed.items() if k.startswith(r))]
                             for k in decoder.state_dict()})
    encoded = backbone.encode(images, idx_keep=idx_keep)
    tokens = utils.set_at_index(utils.repeat_token(method.decoder.mask_token, (6, 17)), idx_keep,
                                decoder.embed(encoded))
    prediction = decoder.predict(utils.get_at_index(decoder.decode(tokens), idx_mask))
    target = utils.get_at_index(utils.patchify(images, 4), idx_mask - 1)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    reference = torch.nn.MSELoss()(prediction, target)

    loss = method.loss(images, idx_keep[:, 1:] - 1, idx_mask - 1)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)
    assert 0.5 < loss.item() < 5.0  # an untrained decoder: about the target's variance, 1


def test_the_loss_is_zero_for_a_perfect_prediction_and_ignores_each_patchs_offset_and_scale():
    target = torch.randn(2, 5, 48)
    normalised = (target - target.mean(-1, keepdim=True)) / target.std(-1, keepdim=True)
    assert reconstruction_loss(normalised, target).item() < 1e-5
    assert reconstruction_loss(normalised, 3 * target + 7).item() < 1e-5
    assert reconstruction_loss(torch.zeros(2, 5, 48), target).item() == pytest.approx(47 / 48, abs=1e-5)


# --- training and the federated split --------------------------------------------------------


def test_mae_trains_on_a_fixed_batch_and_moves_encoder_and_decoder():
    torch.manual_seed(0)
    method = mae()
    images = torch.randn(8, 3, 16, 16)
    keep, masked = random_masking(8, 16, 0.75)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = method.loss(images, keep, masked)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    changed = {k.split(".")[0] for k, v in method.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"encoder", "decoder"}
    assert torch.equal(method.encoder.encoder.pos_embedding, before["encoder.encoder.pos_embedding"])


def test_mae_trains_on_one_view_per_image_in_the_training_loop():
    assert METHODS["mae"].views == 1 and all(METHODS[n].views == 2 for n in METHODS if n != "mae")
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    (view,) = augmenter(RunConfig(method="mae", image_size=16))(images)
    assert view.shape == (12, 3, 16, 16)
    assert len(augmenter(RunConfig(method="byol", image_size=16))(images)) == 2

    settings = StepSettings(batch_size=4, lr=0.05, momentum=0.9, weight_decay=5e-4, amp=False)

    def train() -> dict[str, torch.Tensor]:
        method = mae()
        result = train_epochs(method, images, augmenter(RunConfig(method="mae", image_size=16)),
                              settings=settings, epochs=1, device=torch.device("cpu"), seed=3)
        assert result.steps == 3 and result.loss > 0
        return method.state_dict()

    rng = torch.get_rng_state()
    first = train()
    assert torch.equal(torch.get_rng_state(), rng)  # the masks' generator is forked and restored
    torch.rand(5)  # whatever ran before, the same seed draws the same masks
    assert all(torch.equal(v, first[k]) for k, v in train().items())


def test_a_shared_decoder_is_aggregated_and_a_local_one_never_leaves_the_site():
    shared = mae()
    assert {k.split(".")[0] for k in shared.shared_state()} == {"encoder", "decoder"}
    assert shared.local_state() == {}

    local = mae(mae_share_decoder=False)
    assert {k.split(".")[0] for k in local.shared_state()} == {"encoder"}
    assert local.local_state() and all(k.startswith("decoder.") for k in local.local_state())
    start = {k: v.clone() for k, v in local.local_state().items()}
    with torch.no_grad():
        for p in local.decoder.parameters():
            p.add_(1.0)
    local.init_local()  # a site without a decoder gets the seeded start, not another site's
    assert all(torch.equal(v, start[k]) for k, v in local.local_state().items())
    assert all(torch.equal(v, start[k]) for k, v in mae(mae_share_decoder=False).local_state().items())


# --- the "auto" encoder ------------------------------------------------------------------------


def test_mae_alone_picks_the_vit_and_its_exports_say_so():
    cfg = RunConfig.from_mapping({"method": "mae", "image-size": 16})
    assert cfg.encoder == "auto" and cfg.resolved_encoder == "vit_tiny"
    assert isinstance(build_method(cfg).encoder, VisionTransformer)
    assert weights_metadata(cfg, 1)["encoder"] == "vit_tiny"
    summary = {"final": {"round": 1}}
    config = encoder_config(cfg, summary)
    assert config["architecture"] == "vit_tiny" and "class token" in config["features"]


def test_an_explicit_encoder_mae_cannot_train_is_one_line_naming_key_and_allowed():
    for values in ({"method": "mae", "encoder": "resnet10"}, {"encoder": "mobilenet_v3_small", "method": "mae"}):
        with pytest.raises(ConfigError) as err:
            RunConfig.from_mapping(values)
        assert str(err.value) == (f"encoder={values['encoder']!r} is invalid with method='mae': "
                                  "allowed: auto, vit_tiny")
    with pytest.raises(ConfigError, match="^encoder='resnet18' is invalid with method='mae'"):
        RunConfig(method="byol").replace(method="mae", encoder="resnet18")
    RunConfig.from_mapping({"method": "mae", "encoder": "vit_tiny"})  # explicit and fitting


@pytest.mark.parametrize("name", ["byol", "simsiam", "simclr", "mocov2", "vicreg", "barlowtwins"])
def test_existing_methods_build_resnet10_under_auto_as_before(name):
    auto = RunConfig(method=name, proj_dim=16, hidden_dim=32)
    assert auto.encoder == "auto" and auto.resolved_encoder == "resnet10"
    explicit = build_method(auto.replace(encoder="resnet10")).state_dict()
    assert all(torch.equal(v, explicit[k]) for k, v in build_method(auto).state_dict().items())
    assert weights_metadata(auto, 1)["encoder"] == "resnet10"

