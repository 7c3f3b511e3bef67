// Starts Swagger UI on this service's OpenAPI schema; nothing is fetched from another origin
// (validatorUrl null: no badge from the public validator). Keys typed into "Authorize" stay in page memory.
window.addEventListener("DOMContentLoaded", () => {
  window.ui = window.SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    persistAuthorization: false,
    tryItOutEnabled: false,
    presets: [window.SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
