"""Stop strings across token boundaries: emit text as soon as it cannot be the start of a stop string."""


class StopMatcher:
    """`feed(text) -> (text safe to emit, stopped)`. On a stop, the text before the stop string is returned and the
    stop string itself is not; otherwise only the longest tail that could begin a stop string is held back."""

    def __init__(self, stops: list[str]):
        self.stops = [stop for stop in stops if stop]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buffer = self.held + text
        found = [index for index in (buffer.find(stop) for stop in self.stops) if index >= 0]
        if found:
            self.held = ""
            return buffer[:min(found)], True
        keep = self._longest_partial(buffer)
        self.held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep], False

    def flush(self) -> str:
        """What is held back, for when generation ends without a stop string."""
        held, self.held = self.held, ""
        return held

    def _longest_partial(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:length]):
                    best = length
                    break
        return best
