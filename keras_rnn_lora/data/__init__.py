"""0.1.0's import path of the IWSLT data (`keras_rnn_lora.data.iwslt2017`),
kept so code written against it still runs; new code imports
`keras_rnn_lora.translation.iwslt2017`."""
