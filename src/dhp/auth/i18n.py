"""Texts of the login and consent pages in Uzbek (default), Russian and English."""

from __future__ import annotations

LANGS = ("uz", "ru", "en")
LANG_NAMES = {"uz": "O‘zbekcha", "ru": "Русский", "en": "English"}

MESSAGES: dict[str, dict[str, str]] = {
    "uz": {
        "title_login": "Tizimga kirish",
        "title_consent": "Ruxsat berish",
        "title_error": "Avtorizatsiya xatosi",
        "platform": "Raqamli sog‘liqni saqlash platformasi",
        "intro": "«{client}» ilovasi sizning hisobingizdan foydalanmoqchi. Davom etish uchun tizimga kiring.",
        "username": "Foydalanuvchi nomi",
        "password": "Parol",
        "sign_in": "Kirish",
        "bad_login": "Foydalanuvchi nomi yoki parol noto‘g‘ri.",
        "throttled": "Juda ko‘p muvaffaqiyatsiz urinishlar. Birozdan keyin qayta urinib ko‘ring.",
        "csrf": "Sahifaning muddati o‘tgan yoki so‘rov soxtalashtirilgan. Iltimos, qaytadan boshlang.",
        "consent_intro": "«{client}» ilovasi {user} nomidan quyidagi ruxsatlarni so‘ramoqda:",
        "allow": "Ruxsat berish",
        "deny": "Rad etish",
        "patient_label": "Bemor identifikatori (Patient ID)",
        "patient_help": "Ilova qaysi bemor ma’lumotlari bilan ishlashini tanlang.",
        "patient_missing": "Bemor ko‘rsatilmagan yoki topilmadi.",
        "signed_in_as": "Siz {user} sifatida kirdingiz",
        "language": "Til",
        "scopes": "So‘ralgan ruxsatlar",
        "perm_c": "yaratish", "perm_r": "o‘qish", "perm_u": "o‘zgartirish", "perm_d": "o‘chirish",
        "perm_s": "qidirish",
        "ctx_patient": "bemor ma’lumotlari", "ctx_user": "siz ko‘ra oladigan ma’lumotlar",
        "ctx_system": "barcha ma’lumotlar", "all_types": "barcha resurslar",
        "scope_openid": "Shaxsingizni tasdiqlash", "scope_fhirUser": "FHIR profilingiz havolasi",
        "scope_profile": "Ismingiz va profilingiz",
        "scope_offline_access": "Siz tizimdan chiqqandan keyin ham kirish (offline)",
        "scope_online_access": "Siz tizimda bo‘lganingizda kirish",
        "scope_launch/patient": "Bemorni tanlash", "scope_launch": "Ishga tushirish konteksti",
        "scope_launch/encounter": "Tashrifni tanlash", "scope_dhp/admin": "Platformani boshqarish",
        "where": "shart",
        "error_intro": "So‘rovni bajarib bo‘lmadi:",
    },
    "ru": {
        "title_login": "Вход в систему",
        "title_consent": "Предоставление доступа",
        "title_error": "Ошибка авторизации",
        "platform": "Цифровая платформа здравоохранения",
        "intro": "Приложение «{client}» запрашивает доступ к вашей учётной записи. Войдите, чтобы продолжить.",
        "username": "Имя пользователя",
        "password": "Пароль",
        "sign_in": "Войти",
        "bad_login": "Неверное имя пользователя или пароль.",
        "throttled": "Слишком много неудачных попыток. Повторите попытку позже.",
        "csrf": "Срок действия страницы истёк или запрос подделан. Начните заново.",
        "consent_intro": "Приложение «{client}» запрашивает от имени {user} следующие права:",
        "allow": "Разрешить",
        "deny": "Отклонить",
        "patient_label": "Идентификатор пациента (Patient ID)",
        "patient_help": "Выберите пациента, с данными которого будет работать приложение.",
        "patient_missing": "Пациент не указан или не найден.",
        "signed_in_as": "Вы вошли как {user}",
        "language": "Язык",
        "scopes": "Запрошенные права",
        "perm_c": "создание", "perm_r": "чтение", "perm_u": "изменение", "perm_d": "удаление",
        "perm_s": "поиск",
        "ctx_patient": "данные пациента", "ctx_user": "данные, доступные вам", "ctx_system": "все данные",
        "all_types": "все ресурсы",
        "scope_openid": "Подтверждение личности", "scope_fhirUser": "Ссылка на ваш FHIR-профиль",
        "scope_profile": "Ваше имя и профиль",
        "scope_offline_access": "Доступ после выхода из системы (offline)",
        "scope_online_access": "Доступ, пока вы в системе",
        "scope_launch/patient": "Выбор пациента", "scope_launch": "Контекст запуска",
        "scope_launch/encounter": "Выбор визита", "scope_dhp/admin": "Администрирование платформы",
        "where": "условие",
        "error_intro": "Запрос не может быть выполнен:",
    },
    "en": {
        "title_login": "Sign in",
        "title_consent": "Grant access",
        "title_error": "Authorization error",
        "platform": "Digital Health Platform",
        "intro": "The application “{client}” wants to use your account. Sign in to continue.",
        "username": "Username",
        "password": "Password",
        "sign_in": "Sign in",
        "bad_login": "Wrong username or password.",
        "throttled": "Too many failed attempts. Try again later.",
        "csrf": "This page has expired or the request was forged. Please start again.",
        "consent_intro": "The application “{client}” asks for these permissions on behalf of {user}:",
        "allow": "Allow",
        "deny": "Deny",
        "patient_label": "Patient identifier (Patient ID)",
        "patient_help": "Choose the patient whose record the application will work with.",
        "patient_missing": "No patient given, or the patient was not found.",
        "signed_in_as": "Signed in as {user}",
        "language": "Language",
        "scopes": "Requested permissions",
        "perm_c": "create", "perm_r": "read", "perm_u": "update", "perm_d": "delete", "perm_s": "search",
        "ctx_patient": "the patient's record", "ctx_user": "data you can access", "ctx_system": "all data",
        "all_types": "all resources",
        "scope_openid": "Confirm your identity", "scope_fhirUser": "A link to your FHIR profile",
        "scope_profile": "Your name and profile",
        "scope_offline_access": "Access after you sign out (offline)",
        "scope_online_access": "Access while you are signed in",
        "scope_launch/patient": "Choose a patient", "scope_launch": "Launch context",
        "scope_launch/encounter": "Choose an encounter", "scope_dhp/admin": "Administer the platform",
        "where": "where",
        "error_intro": "The request cannot be completed:",
    },
}


def pick_language(explicit: str | None, accept_language: str | None) -> str:
    """``ui_locales``/``lang`` first, then the browser's Accept-Language, then Uzbek."""
    for cand in (explicit or "").replace(",", " ").split():
        c = cand.split("-")[0].lower()
        if c in LANGS:
            return c
    best: tuple[float, str] | None = None
    for part in (accept_language or "").split(","):
        tag, _, q = part.strip().partition(";q=")
        c = tag.split("-")[0].lower()
        if c not in LANGS:
            continue
        try:
            w = float(q) if q else 1.0
        except ValueError:
            w = 0.0
        if best is None or w > best[0]:
            best = (w, c)
    return best[1] if best else "uz"


def describe_scope(scope: str, lang: str) -> str:
    from dhp.auth.scopes import ScopeError, parse_resource_scope

    m = MESSAGES[lang]
    if f"scope_{scope}" in m:
        return m[f"scope_{scope}"]
    try:
        r = parse_resource_scope(scope)
    except ScopeError:
        return scope
    if r is None:
        return scope
    perms = ", ".join(m[f"perm_{p}"] for p in "cruds" if p in r.perms)
    what = m["all_types"] if r.type == "*" else r.type
    text = f"{what}: {perms} ({m['ctx_' + r.context]})"
    if r.query:
        text += f" — {m['where']} " + ", ".join(f"{k}={v}" for k, v in r.query)
    return text
