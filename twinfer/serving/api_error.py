"""Errors as the OpenAI API returns them: a status code and {"error": {"message", "type", "param", "code"}}."""

from fastapi.responses import JSONResponse

# The error type the OpenAI API gives for each status (its Python client maps statuses to exception classes).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """A request the server answers with an error body instead of a completion."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        """The JSON body OpenAI's clients parse."""
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, param: str | None = None) -> APIError:
    """A 400: the request itself is wrong (a value out of range, a prompt too long, a field not supported)."""
    return APIError(400, message, param=param)
