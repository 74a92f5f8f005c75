"""Stand-in for domainbed.networks: a small MLP featurizer and the linear classifier."""
import math

from torch import nn


class MLPFeaturizer(nn.Module):
    def __init__(self, n_inputs, hparams):
        super().__init__()
        width = hparams["mlp_width"]
        layers = [nn.Linear(n_inputs, width)]
        if hparams.get("stub_batchnorm", False):
            layers.append(nn.BatchNorm1d(width))
        layers += [nn.Tanh(), nn.Dropout(hparams["mlp_dropout"]), nn.Linear(width, width)]
        self.net = nn.Sequential(*layers)
        self.n_outputs = width

    def forward(self, x):
        return self.net(x)


def Featurizer(input_shape, hparams):
    if len(input_shape) == 1:
        return MLPFeaturizer(input_shape[0], hparams)
    # upstream has CNNs for images; the stand-in flattens them into its MLP
    mlp = MLPFeaturizer(math.prod(input_shape), hparams)
    featurizer = nn.Sequential(nn.Flatten(), mlp)
    featurizer.n_outputs = mlp.n_outputs
    return featurizer


def Classifier(in_features, out_features, is_nonlinear=False):
    if is_nonlinear:
        return nn.Sequential(nn.Linear(in_features, in_features // 2), nn.ReLU(),
                             nn.Linear(in_features // 2, out_features))
    return nn.Linear(in_features, out_features)
