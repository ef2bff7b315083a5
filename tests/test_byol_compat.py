"""byol-pytorch 0.9.1 code runs with only its import changed: its README's snippets, its keywords, its heads."""
from __future__ import annotations

import inspect
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

import wrapssl
from wrapssl.compat import BYOL, BYOLTrainer, MockDataset

from conftest import small_cnn

SMALL = dict(projection_size=16, projection_hidden_size=32)

# byol-pytorch 0.9.1's README, snippet by snippet, as published (only the import line differs)
README = {
    "usage": """
import torch
from byol_pytorch import BYOL
from torchvision import models

resnet = models.resnet50(pretrained=True)

learner = BYOL(
    resnet,
    image_size = 256,
    hidden_layer = 'avgpool'
)

opt = torch.optim.Adam(learner.parameters(), lr=3e-4)

def sample_unlabelled_images():
    return torch.randn(20, 3, 256, 256)

for _ in range(100):
    images = sample_unlabelled_images()
    loss = learner(images)
    opt.zero_grad()
    loss.backward()
    opt.step()
    learner.update_moving_average() # update moving average of target encoder

# save your improved network
torch.save(resnet.state_dict(), './improved-net.pt')
""",
    "simsiam": """
import torch
from byol_pytorch import BYOL
from torchvision import models

resnet = models.resnet50(pretrained=True)

learner = BYOL(
    resnet,
    image_size = 256,
    hidden_layer = 'avgpool',
    use_momentum = False       # turn off momentum in the target encoder
)

opt = torch.optim.Adam(learner.parameters(), lr=3e-4)

def sample_unlabelled_images():
    return torch.randn(20, 3, 256, 256)

for _ in range(100):
    images = sample_unlabelled_images()
    loss = learner(images)
    opt.zero_grad()
    loss.backward()
    opt.step()

# save your improved network
torch.save(resnet.state_dict(), './improved-net.pt')
""",
    "advanced": """
learner = BYOL(
    resnet,
    image_size = 256,
    hidden_layer = 'avgpool',
    projection_size = 256,           # the projection size
    projection_hidden_size = 4096,   # the hidden dimension of the MLP for both the projection and prediction
    moving_average_decay = 0.99      # the moving average decay factor for the target encoder, already set at what paper recommends
)
""",
    "augment_fn": """
augment_fn = nn.Sequential(
    kornia.augmentation.RandomHorizontalFlip()
)

learner = BYOL(
    resnet,
    image_size = 256,
    hidden_layer = -2,
    augment_fn = augment_fn
)
""",
    "augment_fn2": """
augment_fn = nn.Sequential(
    kornia.augmentation.RandomHorizontalFlip()
)

augment_fn2 = nn.Sequential(
    kornia.augmentation.RandomHorizontalFlip(),
    kornia.filters.GaussianBlur2d((3, 3), (1.5, 1.5))
)

learner = BYOL(
    resnet,
    image_size = 256,
    hidden_layer = -2,
    augment_fn = augment_fn,
    augment_fn2 = augment_fn2,
)
""",
    "return_embedding": """
import torch
from byol_pytorch import BYOL
from torchvision import models

resnet = models.resnet50(pretrained=True)

learner = BYOL(
    resnet,
    image_size = 256,
    hidden_layer = 'avgpool'
)

imgs = torch.randn(2, 3, 256, 256)
projection, embedding = learner(imgs, return_embedding = True)
""",
    "trainer": """
from torchvision import models

from byol_pytorch import (
    BYOL,
    BYOLTrainer,
    MockDataset
)

resnet = models.resnet50(pretrained = True)

dataset = MockDataset(256, 10000)

trainer = BYOLTrainer(
    resnet,
    dataset = dataset,
    image_size = 256,
    hidden_layer = 'avgpool',
    learning_rate = 3e-4,
    num_train_steps = 100_000,
    batch_size = 16,
    checkpoint_every = 1000     # improved model will be saved periodically to ./checkpoints folder
)

trainer()
""",
}
# The snippets in the middle of the README use names an earlier snippet defined.
CONTEXT = "import kornia\nimport torch\nfrom torch import nn\nfrom torchvision import models\n" \
          "from byol_pytorch import BYOL\nresnet = models.resnet50(pretrained=True)\n"


def runnable(snippet: str) -> str:
    """The snippet with the import changed and its sizes cut for a 2-core CPU: 32 px, 2 steps, 32 images."""
    code = snippet.replace("byol_pytorch", "wrapssl.compat")
    for big, small in (("256", "32"), ("range(100)", "range(2)"), ("100_000", "2"), ("10000", "32"),
                       ("checkpoint_every = 1000", "checkpoint_every = 2")):
        code = code.replace(big, small)
    return code


@pytest.fixture(scope="module")
def resnet50_hub(tmp_path_factory):
    """A torch hub folder whose cache holds resnet50's ImageNet weights file (random weights), written once."""
    home = tmp_path_factory.mktemp("torch")
    url = models.ResNet50_Weights.IMAGENET1K_V1.url
    cache = home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(0)
    state = models.resnet50().state_dict()
    torch.save(state, cache / url.rsplit("/", 1)[-1])
    return home, state


@pytest.fixture
def pretrained_resnet50(resnet50_hub, tmp_path, monkeypatch):
    """torchvision's resnet50(pretrained=True) offline, run from an empty folder; the state it loads."""
    home, state = resnet50_hub
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return state


def run_readme(name: str) -> dict:
    """Run one README snippet (with the context it assumes) and return its namespace."""
    space: dict = {}
    if "resnet =" not in README[name]:
        exec(runnable(CONTEXT), space)
    exec(runnable(textwrap.dedent(README[name])), space)
    return space


# the README's own models.resnet50(pretrained=True) warns that `pretrained` is deprecated
pytestmark = pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")


@pytest.mark.parametrize("name", ["usage", "simsiam"])
def test_readme_training_snippets_train_the_pretrained_net(pretrained_resnet50, tmp_path, name):
    space = run_readme(name)
    saved = torch.load(tmp_path / "improved-net.pt", weights_only=True)
    assert saved.keys() == pretrained_resnet50.keys()
    assert not torch.equal(saved["conv1.weight"], pretrained_resnet50["conv1.weight"])  # it trained
    assert torch.equal(saved["fc.weight"], pretrained_resnet50["fc.weight"])  # past the hidden layer: untouched
    learner = space["learner"]
    assert learner.step == (2 if name == "usage" else 0)
    assert (learner.target_encoder is None) == (name == "simsiam")


@pytest.mark.parametrize("name", ["advanced", "augment_fn", "augment_fn2", "return_embedding"])
def test_readme_construction_snippets(pretrained_resnet50, name):
    space = run_readme(name)
    learner = space["learner"]
    assert isinstance(learner, BYOL) and learner.feature_dim == 2048
    if name == "return_embedding":
        assert space["projection"].shape == (2, 256) and space["embedding"].shape == (2, 2048)
    if name.startswith("augment_fn"):  # the user's kornia pipelines are the views
        for fn in (space["augment_fn"], space.get("augment_fn2", space["augment_fn"])):
            assert any(m is fn for m in learner.views.modules())


def test_readme_trainer_snippet(pretrained_resnet50, tmp_path, fresh_accelerate):
    space = run_readme("trainer")
    trainer = space["trainer"]
    assert trainer.step == 2 and isinstance(trainer, wrapssl.Trainer)
    backbone = torch.load(tmp_path / "checkpoints" / "backbone.pt", weights_only=True)
    assert backbone.keys() == pretrained_resnet50.keys()
    assert not torch.equal(backbone["conv1.weight"], pretrained_resnet50["conv1.weight"])


def test_every_byol_pytorch_keyword_is_accepted():
    """byol-pytorch 0.9.1's BYOL signature, keyword by keyword, with non-default values."""
    learner = BYOL(small_cnn(), image_size=16, hidden_layer=-2, projection_size=12, projection_hidden_size=24,
                   augment_fn=lambda x: x.flip(-1), augment_fn2=lambda x: x, moving_average_decay=0.9,
                   use_momentum=True, sync_batchnorm=False, use_simplicial_embeddings=True, sem_num_simplices=4,
                   sem_simplex_dim=3, sem_temperature=0.5)
    assert learner.momentum == 0.9 and learner.feature_dim == 64
    (linear, _, simplicial), projector = learner.method.projector  # Linear, BN, softmax; then the MLP
    assert linear.in_features == 64 and linear.out_features == 12 and simplicial.temperature == 0.5
    assert projector[0].in_features == 12 and projector[-1].out_features == 12
    learner(torch.rand(4, 3, 16, 16)).backward()
    defaults = inspect.signature(BYOL).parameters
    for name, value in dict(hidden_layer=None, projection_size=256, projection_hidden_size=4096,
                            moving_average_decay=0.99, use_momentum=True, use_simplicial_embeddings=True,
                            sem_num_simplices=32, sem_simplex_dim=8, sem_temperature=0.1).items():
        assert defaults[name].default == value, name


def test_simplicial_embedding_matches_a_naive_softmax_per_group():
    torch.manual_seed(0)
    learner = BYOL(small_cnn(), image_size=16, hidden_layer=-2, sem_num_simplices=4, sem_simplex_dim=3,
                   sem_temperature=0.5, **SMALL).eval()
    h = torch.randn(5, 64)
    embedder = learner.method.projector[0]
    z = embedder[1](embedder[0](h))  # Linear, BatchNorm
    naive = torch.cat([F.softmax(z[:, 3 * i:3 * i + 3] / 0.5, dim=1) for i in range(4)], dim=1)
    torch.testing.assert_close(embedder(h), naive)
    assert torch.allclose(embedder(h).view(5, 4, 3).sum(-1), torch.ones(5, 4))
    plain = BYOL(small_cnn(), image_size=16, hidden_layer=-2, use_simplicial_embeddings=False, **SMALL)
    assert isinstance(plain.method.projector[0], nn.Linear) and plain.method.projector[0].in_features == 64


def test_use_momentum_false_has_no_target_and_a_simsiam_projector():
    learner = BYOL(small_cnn(), image_size=16, use_momentum=False, use_simplicial_embeddings=False, **SMALL)
    assert learner.target_encoder is None
    linears = [m for m in learner.method.projector if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and isinstance(learner.method.projector[-1], nn.BatchNorm1d)
    learner(torch.rand(4, 3, 16, 16)).backward()
    learner.update_moving_average()  # a no-op here, as byol-pytorch users may still call it
    assert learner.step == 1 and learner.net[0].weight.grad is not None


def test_standardised_float_images_are_mapped_back_to_unit_range():
    """randn or normalised batches are read as standardised with the normalisation statistics; [0,1] batches as is."""
    torch.manual_seed(0)
    learner = BYOL(small_cnn(), image_size=16, hidden_layer=-2, **SMALL).eval()
    x = torch.rand(4, 3, 16, 16)
    mean, std = torch.tensor(wrapssl.augment.IMAGENET_MEAN), torch.tensor(wrapssl.augment.IMAGENET_STD)
    standardized = (x - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(learner.embed(standardized), learner.embed(x), rtol=1e-4, atol=1e-5)
    noise = torch.randn(4, 3, 16, 16)
    naive = (noise * std[:, None, None] + mean[:, None, None]).clamp(0, 1)
    torch.testing.assert_close(learner.embed(noise), learner.embed(naive), rtol=1e-4, atol=1e-5)
    assert torch.isfinite(learner.train()(noise))
    strict = BYOL(small_cnn(), image_size=16, hidden_layer=-2, float_input="unit", **SMALL)
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        strict(noise)


def test_mock_dataset_gives_fixed_standard_normal_images():
    ds = MockDataset(8, 5)
    assert len(ds) == 5 and ds[3].shape == (3, 8, 8) and torch.equal(ds[3], ds[3])
    assert not torch.equal(ds[0], ds[1])
    big = torch.stack([MockDataset(32, 64)[i] for i in range(64)])
    assert abs(big.mean().item()) < 0.05 and abs(big.std().item() - 1) < 0.05


def test_byol_trainer_takes_byol_pytorch_keywords(tmp_path, fresh_accelerate):
    torch.manual_seed(0)
    net = small_cnn()
    trainer = BYOLTrainer(net, image_size=16, hidden_layer=-2, learning_rate=3e-4, dataset=MockDataset(16, 16),
                          num_train_steps=2, batch_size=8, checkpoint_every=1, checkpoint_folder=str(tmp_path),
                          byol_kwargs=dict(use_simplicial_embeddings=False, use_momentum=False, **SMALL),
                          accelerator_kwargs=dict(cpu=True), progress=False, plot=False, log_with=())
    learner = trainer.learner
    assert learner.target_encoder is None and learner.momentum == 0.99
    assert isinstance(learner.method.projector[0], nn.Linear) and learner.method.projection_size == 16
    trainer()
    assert trainer.step == 2 and (tmp_path / "backbone.pt").is_file()
