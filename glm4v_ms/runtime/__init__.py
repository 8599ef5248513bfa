"""Running the model: graph engine, generation loop, sampling, and parsing of answers and boxes.
May import model/ and processing/, never apps/."""
