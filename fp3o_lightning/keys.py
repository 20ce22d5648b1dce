"""TensorDict keys shared by the environments, the actor, the collector and the update."""

OBSERVATION = ("agents", "observation")
ACTION = ("agents", "action")
ALIVE = ("agents", "alive")  # SMAC-style maps: False for a dead agent (left out of the policy loss)
ACTION_MASK = ("agents", "action_mask")  # discrete actions: True where an action is available
LOG_PROB = ("agents", "action_log_prob")
LOC, SCALE = ("agents", "loc"), ("agents", "scale")  # the Gaussian's parameters
LOGITS = ("agents", "logits")  # the categorical's parameters
HIDDEN = "rnn_hidden"  # a recurrent actor's hidden state [..., n_agents, hidden], carried by the collector
IS_INIT = "is_init"  # TorchRL's InitTracker: True at the first step of an episode
CRITIC_HIDDEN = "critic_rnn_hidden"  # a recurrent critic's hidden state [..., rows, hidden] at each step
