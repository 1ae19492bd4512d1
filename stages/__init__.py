"""The data flow, one module per step: dataset -> teacher -> soft targets -> cache -> loader -> losses -> student."""
