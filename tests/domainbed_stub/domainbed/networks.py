"""Stand-in for domainbed.networks: a small MLP featurizer for 1-D inputs and the linear classifier."""
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
    if len(input_shape) != 1:
        raise NotImplementedError("the stand-in only has an MLP featurizer for 1-D inputs")
    return MLPFeaturizer(input_shape[0], hparams)


def Classifier(in_features, out_features, is_nonlinear=False):
    if is_nonlinear:
        return nn.Sequential(nn.Linear(in_features, in_features // 2), nn.ReLU(),
                             nn.Linear(in_features // 2, out_features))
    return nn.Linear(in_features, out_features)
